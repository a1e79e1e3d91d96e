"""`axiom import`: a Hugging Face folder (either export format, or any compatible Llama) as an Axiom checkpoint.

The checkpoint holds float32 weights and config.json, as `axiom train` writes them without training state:
`axiom eval` and `axiom generate --ckpt` read it, and continued pretraining starts a fresh optimizer from
these weights. A folder written by `axiom export` carries the original config.json, which is restored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from axiom.cli.args import add_overrides_argument
from axiom.config import apply_overrides
from axiom.errors import AxiomError
from axiom.files import check_no_overlap, check_replaceable, staged_output
from axiom.interop.hf.folder import read_folder
from axiom.model.checkpoint import save_weights, write_checksums


def import_hf(src: str | Path, out: str | Path, force: bool = False, overrides: list[str] | None = None) -> Path:
    """Convert the Hugging Face folder `src` into the checkpoint folder `out`; returns `out`."""
    out = check_replaceable(out, "import", force)
    check_no_overlap(out, {"--hf": src})
    with staged_output(out, "import", force) as tmp:
        fmt, cfg, state, progress = read_folder(src)
        new = apply_overrides(cfg, overrides)
        if new.model != cfg.model:
            raise AxiomError("--set may change training fields only; the model's shape comes from the weights")
        save_weights(state, new, tmp, **{**progress, "imported_from": str(src), "imported_format": fmt})
        write_checksums(tmp)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hf", required=True, help="Hugging Face model folder (axiom export output, or Llama)")
    parser.add_argument("--out", required=True, help="checkpoint folder to write; must be empty or absent")
    parser.add_argument(
        "--force", action="store_true", help="replace --out if it is an earlier axiom import (never anything else)"
    )
    add_overrides_argument(
        parser, "override a TrainConfig field stored with the checkpoint, e.g. --set lr_max=1e-4 (repeatable)"
    )


def run(args: argparse.Namespace) -> None:
    out = import_hf(args.hf, args.out, args.force, args.overrides)
    print(f"imported {args.hf} -> {out}")
