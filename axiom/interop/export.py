"""A checkpoint as a Hugging Face folder that transformers loads offline, or as one GGUF file.

    --format axiom   config.json with auto_map + configuration_axiom.py + modeling_axiom.py (remote code);
                     the weights keep Axiom's names
    --format llama   a native LlamaForCausalLM (names mapped by axiom.interop.hf.names), no remote code
    --format gguf    one .gguf file for llama.cpp, Ollama and LM Studio (axiom.interop.gguf)

Both folders carry model.safetensors (the tied table stored once), generation_config.json, the cl100k_base
tokenizer (tokenizer.json, tokenizer_config.json) and a README.md model card. A checkpoint fine-tuned on chat
data ("chat_template" in its config.json) also carries the ChatML tokens and template in its tokenizer, and
generation stops at <|im_end|>.

--dtype takes torch's names or llama.cpp's, which mean the same (axiom.dtypes): float32 = f32, bfloat16 = bf16,
float16 = f16, int8 = q8_0 (llama.cpp's 8-bit blocks of 32). The folders hold float32 or bfloat16, gguf all four.
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

from axiom.dtypes import FOLDER_DTYPES, GGUF_DTYPES, SPELLINGS, describe, torch_dtype
from axiom.errors import AxiomError, require_installed
from axiom.files import (
    check_no_overlap,
    check_replaceable,
    describe_missing,
    output_lock,
    remove_stale_temps,
    staged_output,
    write_errors,
)
from axiom.interop.hf.card import eval_summary, find_eval_csv, model_card
from axiom.interop.hf.folder import CONFIG, WEIGHTS, hf_config
from axiom.interop.hf.names import to_llama
from axiom.interop.hf.tokenizer import write_tokenizer
from axiom.model.checkpoint import load_model, run_dir_of, save_safetensors, stored_tensors
from axiom.text.chatml import CHAT_TEMPLATE, TURN_END_IDS, is_chat_tuned
from axiom.text.tokenizer import EOS_ID

REMOTE_CODE = Path(__file__).parent / "hf" / "remote"
REMOTE_FILES = ("configuration_axiom.py", "modeling_axiom.py")
FORMAT_DTYPES = {"axiom": FOLDER_DTYPES, "llama": FOLDER_DTYPES, "gguf": GGUF_DTYPES}
GGUF_ONLY = tuple(name for name in GGUF_DTYPES if name not in FOLDER_DTYPES)


def resolve_dtype(fmt: str, dtype: str) -> str:
    """--dtype in either spelling -> its short name (f32, bf16, f16, q8_0), if --format `fmt` writes it."""
    if fmt not in FORMAT_DTYPES:
        raise AxiomError(f"--format {fmt!r}: choose {', '.join(FORMAT_DTYPES)}")
    found = SPELLINGS.get(dtype)
    if found is None or found.name not in FORMAT_DTYPES[fmt]:
        hint = f"; {describe(GGUF_ONLY, 'and')} are for --format gguf" if fmt != "gguf" and found is not None else ""
        raise AxiomError(f"--dtype {dtype}: --format {fmt} writes {describe(FORMAT_DTYPES[fmt])}{hint}")
    return found.short


def long_name(short: str) -> str:
    """The name of an export's dtype in the messages and the model card: torch's, or q8_0."""
    found = SPELLINGS[short]
    return found.short if found.quantized else found.name


def chat_template(meta: dict) -> str | None:
    """The Jinja chat template for a checkpoint whose config.json says "chat_template": "chatml", else None."""
    return CHAT_TEMPLATE if is_chat_tuned(meta) else None


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
    for name in ("transformers", "tokenizers"):  # every format writes the tokenizer through them
        require_installed(name, f"--format {fmt}", "axiom-lm[hf]")
    if fmt == "gguf":
        return _export_gguf(Path(ckpt), out, dtype, force)
    return _export_folder(Path(ckpt), out, fmt, long_name(dtype), force, eval_csv)


def _export_gguf(ckpt: Path, out: str | Path, dtype: str, force: bool) -> Path:
    """`export` to one GGUF file; `dtype`: f32, bf16, f16 or q8_0."""
    from axiom.interop import gguf  # only here: a folder export needs none of it

    out = gguf.check_out_file(out, force)
    check_no_overlap(out, {"--ckpt": ckpt, "the run of --ckpt": run_dir_of(ckpt)})
    with write_errors(out, "nothing was replaced; fix that and run the command again"), output_lock(out, "export"):
        gguf.check_out_file(out, force)  # again: another command may have written it meanwhile
        remove_stale_temps(out)
        model, cfg, meta = load_model(ckpt)
        return gguf.write_gguf(model.state_dict(), cfg.model, out, dtype, out.stem, chat_template(meta))


def _export_folder(
    ckpt: Path, out: str | Path, fmt: str, dtype: str, force: bool, eval_csv: str | Path | None = None
) -> Path:
    """`export` to a Hugging Face folder of format `fmt` (axiom or llama); `dtype`: float32 or bfloat16."""
    out = check_replaceable(out, "export", force)
    if eval_csv is not None and not Path(eval_csv).is_file():
        raise AxiomError(f"--eval-csv {eval_csv}: {describe_missing(Path(eval_csv)).removeprefix('is ')}")
    csv_path = Path(eval_csv) if eval_csv is not None else find_eval_csv(ckpt)
    check_no_overlap(out, {"--ckpt": ckpt, "the run of --ckpt": run_dir_of(ckpt), "the eval.csv": csv_path})
    with staged_output(out, "export", force) as tmp:
        model, cfg, meta = load_model(ckpt)
        chat = chat_template(meta) is not None  # fine-tuned on chat data (an unknown template is an error)
        state = {k: v.detach().to(torch_dtype(dtype)).contiguous() for k, v in stored_tensors(model).items()}
        if fmt == "llama":
            state = to_llama(state, cfg.model)
        evals = eval_summary(csv_path) if csv_path is not None else None
        save_safetensors(state, tmp / WEIGHTS, metadata={"format": "pt"})
        # transformers_version: 4.57.3 warns about a Mistral regex bug on configs that lack it
        config = {**hf_config(cfg, fmt, dtype, meta), "transformers_version": version("transformers")}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        stop = [*TURN_END_IDS, EOS_ID] if chat else EOS_ID  # a chat reply ends at <|im_end|> (or a new <|im_start|>)
        generation = {"bos_token_id": None, "eos_token_id": stop, "pad_token_id": EOS_ID}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(tmp, cfg.model.max_seq_len, chat)
        if fmt == "axiom":
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_CODE / name, tmp / name)
        card = model_card(cfg, meta, fmt, dtype, evals, name=out.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out
