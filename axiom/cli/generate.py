"""`axiom generate`: stream text from a checkpoint, or from a randomly initialised preset."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from axiom.cli.args import (
    add_config_arguments,
    add_decoding_path_arguments,
    add_inference_arguments,
    add_sampling_arguments,
    check_sampling_flags,
    config_file,
    config_from_args,
    eager_decoding,
    preset_of,
)
from axiom.errors import AxiomError
from axiom.infer.engine import SamplingParams
from axiom.infer.fast import load_for_inference, prepare_model
from axiom.infer.generate import stream
from axiom.model.transformer import Axiom
from axiom.runtime import pick_device
from axiom.text.chatml import is_chat_tuned
from axiom.text.stream import TextStream, stop_ids
from axiom.text.tokenizer import load_tokenizer, outside_vocabulary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", help="checkpoint directory (default: a randomly initialised --preset)")
    add_config_arguments(parser)
    parser.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; default: EOS only)")
    add_sampling_arguments(parser, 100, "new tokens per prompt", "prompt i samples with seed + i")
    add_inference_arguments(parser)
    add_decoding_path_arguments(parser)


def run(args: argparse.Namespace) -> None:
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    check_sampling_flags(params)
    _check_row_seeds(params, len(args.prompt or [""]))
    enc = load_tokenizer()
    model, meta = _model(args)
    texts = args.prompt or [""]
    prompts = [enc.encode_ordinary(t) if t else [enc.eot_token] for t in texts]
    _check_context(prompts, model.cfg.max_seq_len, args.max_new_tokens)
    if problem := outside_vocabulary([t for p in prompts for t in p], model.cfg.vocab_size):
        raise AxiomError(f"--prompt: {problem}")
    if not args.ckpt:
        noise = f"randomly initialised {preset_of(args, config_file(args))} weights; the text is noise"
        print(f"notice: no --ckpt: sampling from {noise}", file=sys.stderr)
    compile = not eager_decoding(args, next(model.parameters()).device, "axiom generate")
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    # a chat-tuned model's text ends at the end of its turn too, as in export, GGUF and serving
    replies = [TextStream(stop_ids(chat=is_chat_tuned(meta)), enc=enc) for _ in prompts]
    live = len(prompts) == 1  # one prompt streams to the terminal; a batch prints when done
    if live:
        sys.stdout.write(texts[0])
    for step in stream(model, prompts, args.max_new_tokens, eos_id=enc.eot_token, compile=compile, **sampling):
        for reply, token in zip(replies, step.tolist(), strict=True):
            piece = reply.push(token)
            if live and piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
        if all(reply.stopped for reply in replies):  # e.g. at <|im_end|>, which the decoding does not stop at
            break
    for reply in replies:  # bytes of a character cut off by the end: U+FFFD, as mid-text
        piece = reply.finish()
        if live:
            sys.stdout.write(piece)
    if live:
        print()
        return
    for i, (text, reply) in enumerate(zip(texts, replies, strict=True)):
        print(f"--- sample {i}\n{text}{reply.text}")


def _model(args: argparse.Namespace) -> tuple[Axiom, dict]:
    """The --ckpt's model and its config.json, or a randomly initialised --preset seeded with --seed (and no
    config.json), readied for decoding."""
    if args.ckpt:
        if args.preset or args.config is not None or args.overrides:
            raise AxiomError(
                "--preset, --config and --set choose the random model of a run without --ckpt; a "
                "checkpoint brings its own config: leave them out"
            )
        return load_for_inference(args.ckpt, args.device, args.dtype)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    return prepare_model(Axiom(config_from_args(args).model).to(device), args.dtype), {}


def _check_row_seeds(params: SamplingParams, rows: int) -> None:
    """Prompt i samples with seed + i: the last prompt's seed must be one the engine takes too (the first one
    checked is --seed itself)."""
    if params.seed is None or rows < 2:
        return
    last = dataclasses.replace(params, seed=params.seed + rows - 1)
    if problem := last.problem():
        raise AxiomError(
            f"--seed {params.seed}: prompt {rows - 1} samples with seed + {rows - 1} = {last.seed}, which {problem[1]}"
        )


def _check_context(prompts: list[list[int]], context: int, max_new_tokens: int) -> None:
    """An error for a prompt that leaves no room in the context; a note on stderr when the new tokens are capped."""
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise AxiomError(
            f"--prompt: {longest} tokens, but the model's context is {context} tokens and a prompt must leave room "
            "for at least one new token; shorten the prompt"
        )
    if longest + max_new_tokens > context:
        print(
            f"axiom generate: note: --max-new-tokens {max_new_tokens} capped to {context - longest}: the "
            f"{'longest ' if len(prompts) > 1 else ''}prompt ({longest} tokens) and its new tokens fill the "
            f"context of {context}",
            file=sys.stderr,
        )
