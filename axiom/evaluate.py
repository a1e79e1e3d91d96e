"""`axiom eval`: validation loss, perplexity and bits per byte of a checkpoint; `evaluate` is what training calls.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the evaluated target tokens, counted
exactly from the tokenizer (EOS counts as 0 bytes), so it compares across tokenizers and eval sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from axiom.checkpoint import load_model
from axiom.errors import AxiomError
from axiom.loader import eval_batches, read_manifest
from axiom.parallel import pick_device
from axiom.tokenizer import load_tokenizer


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per token, nats
    ppl: float
    bpb: float  # bits per UTF-8 byte of the target text
    tokens: int
    bytes: int


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> torch.Tensor:
    """(vocab,) UTF-8 length of every token id; special tokens (EOS included) and unused ids count 0."""
    enc = load_tokenizer()
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i in special:
            continue
        with contextlib.suppress(KeyError):
            lengths[i] = len(enc.decode_single_token_bytes(i))
    return torch.from_numpy(lengths)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; the CPU runs fp32 (CPU autocast is slow and not bit-reproducible)."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    dtype: str = "float32",
) -> EvalResult:
    """Loss over the first `eval_tokens` tokens of the val split (fixed windows, the same on every call)."""
    device = next(model.parameters()).device
    lengths = token_byte_lengths()
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = nbytes = 0
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)  # ids past it fail in eval_batches
    try:
        for x, y in eval_batches(data_dir, seq_len, batch_size, eval_tokens, vocab_size):
            with autocast(device, dtype):
                loss = model(x.to(device), y.to(device))
            total_nats += loss.double() * y.numel()
            tokens += y.numel()
            nbytes += int(lengths[y].sum())
    finally:
        model.train(was_training)
    loss = total_nats.item() / tokens
    return EvalResult(
        loss=loss,
        ppl=math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        bpb=total_nats.item() / math.log(2) / max(nbytes, 1),
        tokens=tokens,
        bytes=nbytes,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. RUN/checkpoints/best)")
    parser.add_argument("--data", required=True, help="prepared data directory (from axiom prepare)")
    parser.add_argument("--eval-tokens", type=int, help="validation tokens (default: the checkpoint's eval_tokens)")
    parser.add_argument("--batch-size", type=int, help="sequences per batch (default: its micro_batch_size)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> None:
    for flag, value in (("--eval-tokens", args.eval_tokens), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            raise AxiomError(f"{flag} {value}: must be positive")
    device = pick_device(args.device)
    read_manifest(args.data)  # a clear error before the model loads
    model, cfg, meta = load_model(args.ckpt, device)
    t = cfg.train
    seq_len = min(t.seq_len, cfg.model.max_seq_len)
    eval_tokens = args.eval_tokens if args.eval_tokens is not None else t.eval_tokens
    if eval_tokens < seq_len:
        raise AxiomError(f"--eval-tokens {eval_tokens}: less than one sequence of {seq_len} tokens")
    result = evaluate(
        model,
        args.data,
        seq_len=seq_len,
        batch_size=args.batch_size if args.batch_size is not None else t.micro_batch_size,
        eval_tokens=eval_tokens,
        dtype=t.dtype,
    )
    if not math.isfinite(result.loss):
        raise AxiomError(
            f"{args.ckpt}: the validation loss is {result.loss} (not finite) over {result.tokens:,} tokens; the "
            "model overflows on this data (a diverged run?)"
        )
    out = {"ckpt": str(args.ckpt), "step": meta.get("step"), "tokens_seen": meta.get("tokens"), **asdict(result)}
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"{args.ckpt} (step {out['step']}): val loss {result.loss:.4f}, ppl {result.ppl:.2f}, "
        f"bpb {result.bpb:.4f} over {result.tokens:,} tokens ({result.bytes:,} bytes)"
    )
