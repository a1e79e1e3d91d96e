"""`axiom generate`: stream text from a checkpoint, or from a randomly initialised preset."""

from __future__ import annotations

import argparse
import codecs
import sys

import torch

from axiom.cli.args import (
    add_config_arguments,
    add_inference_arguments,
    add_sampling_arguments,
    check_sampling_flags,
    config_from_args,
)
from axiom.errors import AxiomError
from axiom.infer.fast import prepare_model
from axiom.infer.generate import SamplingParams, stream
from axiom.model.checkpoint import load_model
from axiom.model.transformer import Axiom
from axiom.runtime import pick_device
from axiom.text.tokenizer import load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="checkpoint directory (default: a randomly initialised --preset)")
    add_config_arguments(parser)
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: EOS only)")
    add_sampling_arguments(parser, 100, "new tokens per prompt", "prompt i samples with seed + i")
    add_inference_arguments(parser)


def load_for_inference(ckpt: str, device: str | None, dtype: str) -> tuple[Axiom, dict]:
    """A checkpoint's model on `device`, readied for decoding in `dtype` (axiom.infer.fast.prepare_model), and its
    config.json."""
    model, _, meta = load_model(ckpt, pick_device(device))
    return prepare_model(model, dtype), meta


def token_bytes(enc, token: int) -> bytes:
    """The bytes a token stands for; an id the vocabulary leaves unassigned (cl100k_base has 100261-100275, which an
    untrained model may still pick) shows as U+FFFD."""
    try:
        return enc.decode_single_token_bytes(token)
    except KeyError:
        return "\ufffd".encode()


def run(args: argparse.Namespace) -> None:
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    check_sampling_flags(params)
    enc = load_tokenizer()
    if args.ckpt:
        model, _ = load_for_inference(args.ckpt, args.device, args.dtype)
    else:
        device = pick_device(args.device)
        torch.manual_seed(args.seed)
        model = prepare_model(Axiom(config_from_args(args).model).to(device), args.dtype)
    texts = args.prompt or [""]
    prompts = [enc.encode_ordinary(t) if t else [enc.eot_token] for t in texts]
    context, longest = model.cfg.max_seq_len, max(len(p) for p in prompts)
    if longest >= context:
        raise AxiomError(
            f"--prompt: {longest} tokens, but the model's context is {context} tokens and a prompt must leave room "
            "for at least one new token; shorten the prompt"
        )
    if longest + args.max_new_tokens > context:
        print(
            f"axiom generate: note: --max-new-tokens {args.max_new_tokens} capped to {context - longest}: the "
            f"{'longest ' if len(prompts) > 1 else ''}prompt ({longest} tokens) and its new tokens fill the "
            f"context of {context}",
            file=sys.stderr,
        )
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
            piece = decoders[i].decode(token_bytes(enc, token))
            outputs[i] += piece
            if live:
                sys.stdout.write(piece)
                sys.stdout.flush()
    for i, decoder in enumerate(decoders):  # bytes of a character cut off by the end: U+FFFD, as mid-text
        piece = decoder.decode(b"", final=True)
        outputs[i] += piece
        if live:
            sys.stdout.write(piece)
    if live:
        print()
        return
    for i, text in enumerate(outputs):
        print(f"--- sample {i}\n{text}")
