"""Validation loss, perplexity and bits per byte of a model on a prepared val split: `evaluate`, what training and
`axiom eval --data` (axiom/cli/eval.py) call.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the evaluated target tokens, counted
exactly from the tokenizer (EOS counts as 0 bytes), so it compares across tokenizers and eval sizes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from axiom.data.loader import data_kind, eval_batches, read_manifest
from axiom.data.packing import chat_eval_batches
from axiom.model.loss import IGNORE_INDEX
from axiom.runtime import autocast
from axiom.text.tokenizer import load_tokenizer


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


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows a float (a loss past ~709.8 nats: a diverged model)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def val_batches(
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    vocab_size: int | None = None,
    manifest: dict | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The (inputs, targets) batches an evaluation reads: `eval_batches`, or on chat data `chat_eval_batches`;
    `manifest`: the data's, where the caller has read it."""
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    batches = chat_eval_batches if data_kind(manifest) == "chat" else eval_batches
    return batches(data_dir, seq_len, batch_size, eval_tokens, vocab_size, manifest)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    dtype: str = "float32",
    manifest: dict | None = None,
) -> EvalResult:
    """Loss over the first `eval_tokens` tokens of the val split (fixed windows, the same on every call);
    `manifest` as in `val_batches`.

    On chat data (axiom.data.packing) only the trained tokens count: loss, tokens and bytes are those of the targets
    that are not -100 (assistant replies and their <|im_end|>)."""
    device = next(model.parameters()).device
    lengths = token_byte_lengths()
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = nbytes = 0
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)  # ids past it fail in eval_batches
    try:
        for x, y in val_batches(data_dir, seq_len, batch_size, eval_tokens, vocab_size, manifest):
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
        ppl=perplexity(loss),
        bpb=total_nats.item() / math.log(2) / max(nbytes, 1),
        tokens=tokens,
        bytes=nbytes,
    )
