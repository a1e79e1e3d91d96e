"""`axiom generate`: stream text from a checkpoint, or from a randomly initialised preset."""

from __future__ import annotations

import argparse
import codecs
import sys

import torch

from axiom.checkpoint import load_model
from axiom.config import add_config_arguments, config_from_args
from axiom.generate import stream
from axiom.model import Axiom
from axiom.tokenizer import load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="checkpoint directory (default: a randomly initialised --preset)")
    add_config_arguments(parser)
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: EOS only)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, e.g. 0.95")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> None:
    enc = load_tokenizer()
    if args.ckpt:
        model, _, _ = load_model(args.ckpt, args.device)
    else:
        torch.manual_seed(args.seed)
        model = Axiom(config_from_args(args).model).to(args.device)
    model.eval()
    texts = args.prompt or [""]
    prompts = [enc.encode_ordinary(t) if t else [enc.eot_token] for t in texts]
    kwargs = dict(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=enc.eot_token
    )
    decoders = [codecs.getincrementaldecoder("utf-8")(errors="replace") for _ in prompts]
    outputs = list(texts)
    live = len(prompts) == 1  # one prompt streams to the terminal; a batch prints when done
    if live:
        sys.stdout.write(texts[0])
    for step in stream(model, prompts, args.max_new_tokens, **kwargs):
        for i, token in enumerate(step.tolist()):
            if token == enc.eot_token:
                continue
            piece = decoders[i].decode(enc.decode_single_token_bytes(token))
            outputs[i] += piece
            if live:
                sys.stdout.write(piece)
                sys.stdout.flush()
    if live:
        print()
        return
    for i, text in enumerate(outputs):
        print(f"--- sample {i}\n{text}")
