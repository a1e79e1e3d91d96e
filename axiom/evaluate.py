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
from axiom.loader import data_kind, eval_batches, read_manifest
from axiom.model import IGNORE_INDEX
from axiom.packing import chat_eval_batches
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
    """Loss over the first `eval_tokens` tokens of the val split (fixed windows, the same on every call).

    On chat data (axiom.packing) only the trained tokens count: loss, tokens and bytes are those of the targets
    that are not -100 (assistant replies and their <|im_end|>)."""
    device = next(model.parameters()).device
    chat = data_kind(read_manifest(data_dir)) == "chat"
    lengths = token_byte_lengths()
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = nbytes = 0
    try:
        for x, y in (chat_eval_batches if chat else eval_batches)(data_dir, seq_len, batch_size, eval_tokens):
            with autocast(device, dtype):
                loss = model(x.to(device), y.to(device))
            targets = y[y != IGNORE_INDEX]  # all of y for text data
            total_nats += loss.double() * targets.numel()
            tokens += targets.numel()
            nbytes += int(lengths[targets].sum())
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> None:
    read_manifest(args.data)  # a clear error before the model loads
    model, cfg, meta = load_model(args.ckpt, args.device)
    t = cfg.train
    result = evaluate(
        model,
        args.data,
        seq_len=min(t.seq_len, cfg.model.max_seq_len),
        batch_size=args.batch_size or t.micro_batch_size,
        eval_tokens=args.eval_tokens or t.eval_tokens,
        dtype=t.dtype,
    )
    out = {"ckpt": str(args.ckpt), "step": meta.get("step"), "tokens_seen": meta.get("tokens"), **asdict(result)}
    if args.json:
        print(json.dumps(out))
        return
    print(
        f"{args.ckpt} (step {out['step']}): val loss {result.loss:.4f}, ppl {result.ppl:.2f}, "
        f"bpb {result.bpb:.4f} over {result.tokens:,} tokens ({result.bytes:,} bytes)"
    )
