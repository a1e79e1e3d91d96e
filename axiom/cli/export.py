"""`axiom export`: a checkpoint as a Hugging Face folder (remote code or Llama) or a GGUF file
(axiom.interop.export)."""

from __future__ import annotations

import argparse

from axiom.dtypes import FOLDER_DTYPES, GGUF_DTYPES, describe, spellings
from axiom.interop.export import FORMAT_DTYPES, GGUF_ONLY, export, long_name, resolve_dtype
from axiom.model.checkpoint import read_meta
from axiom.text.chatml import is_chat_tuned


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
        default="float32",
        choices=spellings(GGUF_DTYPES),
        metavar="DTYPE",
        help=f"weights: {describe(FOLDER_DTYPES)} for every format, {describe(GGUF_ONLY)} for gguf; int8 is "
        "llama.cpp's 8-bit blocks of 32; default: float32",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace --out if it is an earlier axiom export holding nothing else (a folder, or for gguf a GGUF file "
        "that axiom wrote; never anything else)",
    )
    parser.add_argument("--eval-csv", help="the run's eval.csv for the model card (default: found next to --ckpt)")


def run(args: argparse.Namespace) -> None:
    out = export(args.ckpt, args.out, args.format, args.dtype, args.force, args.eval_csv)
    dtype = resolve_dtype(args.format, args.dtype)
    print(f"exported {args.ckpt} -> {out} ({args.format}, {long_name(dtype)})")
    if args.format == "gguf":
        chat = is_chat_tuned(read_meta(args.ckpt))  # a chat model talks through its template
        how = "-cnv --jinja" if chat else "-p 'The meaning of life is' -n 40 -no-cnv"
        print(f"run with: llama-completion -m {out} {how}")
        return
    remote = ", trust_remote_code=True" if args.format == "axiom" else ""
    print(f"load with: AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})")
