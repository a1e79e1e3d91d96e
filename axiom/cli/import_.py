"""`axiom import`: a Hugging Face folder (either export format, or any compatible Llama) as an Axiom checkpoint
(axiom.interop.importer)."""

from __future__ import annotations

import argparse

from axiom.cli.args import add_overrides_argument
from axiom.interop.importer import import_hf


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
