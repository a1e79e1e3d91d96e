"""`axiom export`: a checkpoint as a Hugging Face folder that transformers loads offline, or as one GGUF file.

    --format axiom   config.json with auto_map + configuration_axiom.py + modeling_axiom.py (remote code);
                     the weights keep Axiom's names
    --format llama   a native LlamaForCausalLM (names mapped by axiom.interop.hf.names), no remote code
    --format gguf    one .gguf file for llama.cpp, Ollama and LM Studio (axiom.interop.gguf)

Both folders carry model.safetensors (the tied table stored once), generation_config.json, the cl100k_base
tokenizer (tokenizer.json, tokenizer_config.json) and a README.md model card. A checkpoint fine-tuned on chat
data ("chat_template" in its config.json) also carries the ChatML tokens and template in its tokenizer, and
generation stops at <|im_end|>.

--dtype takes llama.cpp's short names or torch's long ones, which mean the same: f32 = float32,
bf16 = bfloat16, f16 = float16; q8_0 is llama.cpp's 8-bit blocks. The folders hold f32 or bf16, gguf all four.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import torch

from axiom.errors import AxiomError
from axiom.files import check_no_overlap, describe_missing, output_lock, remove_stale_temps, write_errors
from axiom.interop.gguf import chat_template, check_out_file, write_gguf
from axiom.interop.hf.card import eval_summary, find_eval_csv, model_card
from axiom.interop.hf.folder import CONFIG, WEIGHTS, check_out, hf_config, staged_dir
from axiom.interop.hf.names import to_llama
from axiom.interop.hf.tokenizer import write_tokenizer
from axiom.model.checkpoint import load_model, run_dir_of, save_safetensors, stored_tensors
from axiom.text.chatml import IM_END
from axiom.text.tokenizer import EOS_ID

REMOTE_CODE = Path(__file__).parent / "hf" / "remote"
REMOTE_FILES = ("configuration_axiom.py", "modeling_axiom.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # the folders' weight dtypes
FORMAT_DTYPES = {"axiom": ("f32", "bf16"), "llama": ("f32", "bf16"), "gguf": ("f32", "bf16", "f16", "q8_0")}
LONG_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}
SHORT_NAMES = {long: short for short, long in LONG_NAMES.items()}


def resolve_dtype(fmt: str, dtype: str) -> str:
    """--dtype in either spelling -> its short name (f32, bf16, f16, q8_0), if --format `fmt` writes it."""
    if fmt not in FORMAT_DTYPES:
        raise AxiomError(f"--format {fmt!r}: choose {', '.join(FORMAT_DTYPES)}")
    short = SHORT_NAMES.get(dtype, dtype)
    if short not in FORMAT_DTYPES[fmt]:
        names = [f"{d} ({LONG_NAMES[d]})" if d in LONG_NAMES else d for d in FORMAT_DTYPES[fmt]]
        choices = f"{', '.join(names[:-1])} or {names[-1]}"
        hint = "; f16 and q8_0 are for --format gguf" if fmt != "gguf" and short in FORMAT_DTYPES["gguf"] else ""
        raise AxiomError(f"--dtype {dtype}: --format {fmt} writes {choices}{hint}")
    return short


def export(
    ckpt: str | Path,
    out: str | Path,
    fmt: str = "axiom",
    dtype: str = "float32",
    force: bool = False,
    eval_csv: str | Path | None = None,
) -> Path:
    """Write the Hugging Face folder (or, for `gguf`, the file) `out` for checkpoint `ckpt`; returns `out`."""
    dtype = resolve_dtype(fmt, dtype)
    ckpt = Path(ckpt)
    if fmt == "gguf":
        out = check_out_file(out, force)
        check_no_overlap(out, {"--ckpt": ckpt, "the run of --ckpt": run_dir_of(ckpt)})
        with write_errors(out, "nothing was replaced; fix that and run the command again"), output_lock(out, "export"):
            remove_stale_temps(out)
            model, cfg, meta = load_model(ckpt)
            return write_gguf(model.state_dict(), cfg.model, out, dtype, out.stem, chat_template(meta))
    dtype = LONG_NAMES[dtype]
    out = check_out(out, force, "export")
    if eval_csv is not None and not Path(eval_csv).is_file():
        raise AxiomError(f"--eval-csv {eval_csv}: {describe_missing(Path(eval_csv)).removeprefix('is ')}")
    csv_path = Path(eval_csv) if eval_csv is not None else find_eval_csv(ckpt)
    check_no_overlap(out, {"--ckpt": ckpt, "the run of --ckpt": run_dir_of(ckpt), "the eval.csv": csv_path})
    with staged_dir(out, force, "export") as tmp:
        model, cfg, meta = load_model(ckpt)
        chat = chat_template(meta) is not None  # fine-tuned on chat data (an unknown template is an error)
        state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in stored_tensors(model).items()}
        if fmt == "llama":
            state = to_llama(state, cfg.model)
        evals = eval_summary(csv_path) if csv_path is not None else None
        save_safetensors(state, tmp / WEIGHTS, metadata={"format": "pt"})
        # transformers_version: 4.57.3 warns about a Mistral regex bug on configs that lack it
        config = {**hf_config(cfg, fmt, dtype, meta), "transformers_version": version("transformers")}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        stop = [IM_END, EOS_ID] if chat else EOS_ID  # a chat model's reply ends with <|im_end|>
        generation = {"bos_token_id": None, "eos_token_id": stop, "pad_token_id": EOS_ID}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(tmp, cfg.model.max_seq_len, chat)
        if fmt == "axiom":
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_CODE / name, tmp / name)
        card = model_card(cfg, meta, fmt, dtype, evals, name=out.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (model.safetensors + config.json)")
    parser.add_argument(
        "--out",
        required=True,
        help="folder to write: absent or empty (or see --force), outside the checkpoint's run; gguf: a file, e.g. "
        "model.gguf",
    )
    parser.add_argument(
        "--format",
        default="axiom",
        choices=list(FORMAT_DTYPES),
        help="axiom: Axiom's code as transformers remote code (default); llama: native LlamaForCausalLM; "
        "gguf: one file for llama.cpp, Ollama and LM Studio",
    )
    parser.add_argument(
        "--dtype",
        default="f32",
        choices=[*FORMAT_DTYPES["gguf"], *SHORT_NAMES],
        metavar="DTYPE",
        help="weights: f32 (= float32, default) or bf16 (= bfloat16) for every format; "
        "f16 (= float16) or q8_0 (8-bit blocks) for gguf",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it is an earlier axiom export (a folder, or for gguf a GGUF file; never anything else)",
    )
    parser.add_argument("--eval-csv", help="the run's eval.csv for the model card (default: found next to --ckpt)")


def run(args: argparse.Namespace) -> None:
    out = export(args.ckpt, args.out, args.format, args.dtype, args.force, args.eval_csv)
    dtype = resolve_dtype(args.format, args.dtype)
    print(f"exported {args.ckpt} -> {out} ({args.format}, {LONG_NAMES.get(dtype, dtype)})")
    if args.format == "gguf":
        print(f"run with: llama-completion -m {out} -p 'The meaning of life is' -n 40 -no-cnv")
        return
    remote = ", trust_remote_code=True" if args.format == "axiom" else ""
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")
