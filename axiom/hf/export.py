"""`axiom export`: a checkpoint as a Hugging Face folder that transformers loads offline.

    --format axiom   config.json with auto_map + configuration_axiom.py + modeling_axiom.py (remote code);
                     the weights keep Axiom's names
    --format llama   a native LlamaForCausalLM (names mapped by axiom.hf.names), no remote code

Both carry model.safetensors (the tied table stored once), generation_config.json, the cl100k_base tokenizer
(tokenizer.json, tokenizer_config.json) and a README.md model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import torch

from axiom.checkpoint import load_model, run_dir_of, save_safetensors, stored_tensors
from axiom.errors import AxiomError
from axiom.files import check_no_overlap, describe_missing
from axiom.hf.card import eval_summary, find_eval_csv, model_card
from axiom.hf.folder import CONFIG, WEIGHTS, check_out, hf_config, staged_dir
from axiom.hf.names import to_llama
from axiom.hf.tokenizer import write_tokenizer
from axiom.tokenizer import EOS_ID

REMOTE_CODE = Path(__file__).parent / "remote"
REMOTE_FILES = ("configuration_axiom.py", "modeling_axiom.py")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def export(
    ckpt: str | Path,
    out: str | Path,
    fmt: str = "axiom",
    dtype: str = "float32",
    force: bool = False,
    eval_csv: str | Path | None = None,
) -> Path:
    """Write the Hugging Face folder `out` for checkpoint `ckpt`; returns `out`."""
    if fmt not in ("axiom", "llama"):
        raise AxiomError(f"--format {fmt!r}: choose axiom or llama")
    if dtype not in DTYPES:
        raise AxiomError(f"--dtype {dtype!r}: choose {' or '.join(DTYPES)}")
    ckpt, out = Path(ckpt), check_out(out, force, "export")
    if eval_csv is not None and not Path(eval_csv).is_file():
        raise AxiomError(f"--eval-csv {eval_csv}: {describe_missing(Path(eval_csv)).removeprefix('is ')}")
    csv_path = Path(eval_csv) if eval_csv is not None else find_eval_csv(ckpt)
    check_no_overlap(out, {"--ckpt": ckpt, "the run of --ckpt": run_dir_of(ckpt), "the eval.csv": csv_path})
    with staged_dir(out, force, "export") as tmp:
        model, cfg, meta = load_model(ckpt)
        state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in stored_tensors(model).items()}
        if fmt == "llama":
            state = to_llama(state, cfg.model)
        evals = eval_summary(csv_path) if csv_path is not None else None
        save_safetensors(state, tmp / WEIGHTS, metadata={"format": "pt"})
        # transformers_version: 4.57.3 warns about a Mistral regex bug on configs that lack it
        config = {**hf_config(cfg, fmt, dtype, meta), "transformers_version": version("transformers")}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        generation = {"bos_token_id": None, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(tmp, cfg.model.max_seq_len)
        if fmt == "axiom":
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE_CODE / name, tmp / name)
        card = model_card(cfg, meta, fmt, dtype, evals, name=out.name)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (model.safetensors + config.json)")
    parser.add_argument(
        "--out", required=True, help="folder to write: absent or empty (or see --force); outside the checkpoint's run"
    )
    parser.add_argument(
        "--format",
        default="axiom",
        choices=["axiom", "llama"],
        help="axiom: Axiom's code as transformers remote code (default); llama: native LlamaForCausalLM",
    )
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="weight dtype (default float32)")
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it is an earlier axiom export (never anything else)"
    )
    parser.add_argument("--eval-csv", help="the run's eval.csv for the model card (default: found next to --ckpt)")


def run(args: argparse.Namespace) -> None:
    out = export(args.ckpt, args.out, args.format, args.dtype, args.force, args.eval_csv)
    remote = ", trust_remote_code=True" if args.format == "axiom" else ""
    print(f"exported {args.ckpt} -> {out} ({args.format}, {args.dtype})")
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")
