"""Picking the next token of a batch of rows on the device: greedy, temperature, top-k and top-p, every row with its
own parameters and its own seeded randomness, in one batched computation with no torch.Generator and nothing read
back but the picked ids.

The rows' parameters are (B,) tensors (`RowSampling`). A sampled row draws by the Gumbel-max trick: the index of the
largest l / T + g, with g standard Gumbel noise, is distributed as softmax(l / T). Row b's noise for vocabulary entry
v is a hash of (its seed, the text position of the token it draws, v) made of integer tensor ops, so its draws
depend on its own seed and position alone: never on its batch neighbours, their parameters or their number. Top-k
and top-p become one cut-off per row, its smallest kept scaled logit, found among the largest logits after one
`topk` or sort; entries below it are masked before the argmax, which then samples the filtered, renormalised
distribution exactly. Every shape is fixed by the batch and the vocabulary, so the pick runs eagerly or inside a
compiled decoding step (one CUDA graph on a GPU). Greedy rows (temperature 0) take the exact argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
from torch import Tensor

from axiom.model.loss import row_blocks

# Top-k values up to this many are cut among the largest logits (`topk`, a partial selection); a larger top-k, or a
# top-p without a top-k, needs the whole vocabulary sorted, far slower on CPU (docs/benchmarks.md, "Sampling on the
# device").
TOP_CANDIDATES = 256
# Temperatures above 0 and below this decode greedily. Dividing float32 logits by a smaller one overflows for
# large logits (1e-45 rounds to a denormal, 1e-50 to 0: inf, then NaN), and at 1e-4 a lead of 0.01 in logits
# already makes the runner-up e^-100 times as likely: sampling picks the greedy token anyway but for near-ties.
MIN_TEMPERATURE = 1e-4


class Cut(Enum):
    """How far a batch's top-k/top-p cut-offs look, decided on the host from the rows' parameters (a compiled step
    has one graph per member)."""

    NONE = "none"  # no sampled row filters
    TOP = "top"  # every filtering row has a top_k <= TOP_CANDIDATES: its cut-off lies among that many largest
    ALL = "all"  # a top_p without a top_k, or a larger top_k: the whole vocabulary, sorted


class Params(Protocol):
    """What sampling reads of a request's parameters (axiom.infer.engine.SamplingParams)."""

    temperature: float
    top_k: int | None
    top_p: float | None


@dataclass(frozen=True)
class RowSampling:
    """The sampling parameters of B rows as device tensors."""

    temperature: Tensor  # (B,) float32; 0: greedy (so is any below MIN_TEMPERATURE)
    top_k: Tensor  # (B,) int64; 0: no top-k
    top_p: Tensor  # (B,) float32; 1: no top-p
    seed: Tensor  # (B,) int64
    cut: Cut

    @classmethod
    def of(cls, params: Sequence[Params], seeds: Sequence[int], size: int, device: torch.device) -> RowSampling:
        """Rows with `params` and `seeds` (any int, taken modulo 2**64), then greedy rows up to `size`: two copies to
        the device."""
        pad = size - len(params)
        floats = [(_temperature(p), 1.0 if p.top_p is None else p.top_p) for p in params] + [(0.0, 1.0)] * pad
        # a top-k beyond any vocabulary keeps everything: capped to fit int64 (a client may send 10**30)
        ints = [(min(p.top_k or 0, 2**31), (s + 2**63) % 2**64 - 2**63) for p, s in zip(params, seeds, strict=True)]
        f = torch.tensor(floats, dtype=torch.float32).to(device)
        i = torch.tensor(ints + [(0, 0)] * pad, dtype=torch.int64).to(device)
        return cls(f[:, 0], i[:, 0], f[:, 1], i[:, 1], _cut(params))


def _temperature(p: Params) -> float:
    return p.temperature if p.temperature >= MIN_TEMPERATURE else 0.0


def _cut(params: Sequence[Params]) -> Cut:
    filtering = [p for p in params if _temperature(p) > 0 and (p.top_k or (p.top_p or 1.0) < 1.0)]
    if not filtering:
        return Cut.NONE
    return Cut.TOP if all(p.top_k and p.top_k <= TOP_CANDIDATES for p in filtering) else Cut.ALL


def pick(logits: Tensor, rows: RowSampling, positions: Tensor) -> Tensor:
    """(B, V) logits -> (B,) token ids: the argmax for greedy rows, a draw from softmax(logits / temperature) after
    top-k and top-p for the others. `positions` (B,) int64: the text position of the token each row draws (its
    prompt and the tokens before it), which with the row's seed fixes its noise."""
    sampled = rows.temperature > 0
    scaled = logits.float() / torch.where(sampled, rows.temperature, 1.0)[:, None]
    scores = scaled + gumbel_noise(rows.seed, positions, logits.shape[-1])
    if rows.cut is not Cut.NONE:
        scores = scores.masked_fill(scaled < cutoff(scaled, rows), float("-inf"))
    return torch.where(sampled, greedy(scores), greedy(logits))


def cutoff(scaled: Tensor, rows: RowSampling) -> Tensor:
    """(B, 1): each row's smallest scaled logit kept by its top-k (the k largest, ties with the k-th kept) and then
    its top-p (the smallest prefix of the most likely whose mass reaches top_p, and the tokens tied with its last);
    -inf for a row with neither."""
    inf = float("inf")
    if rows.cut is Cut.TOP and scaled.shape[-1] > TOP_CANDIDATES:
        top = scaled.topk(TOP_CANDIDATES, dim=-1).values  # descending
    else:
        top = scaled.sort(dim=-1, descending=True).values
    k = rows.top_k.clamp(max=top.shape[-1])[:, None]
    kth = torch.where(k > 0, top.gather(-1, (k - 1).clamp(min=0)), -inf)
    probs = torch.softmax(top.masked_fill(top < kth, -inf), dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the more likely tokens
    p = torch.where(rows.top_p < 1.0, rows.top_p, inf)[:, None]
    first = torch.arange(top.shape[-1], device=top.device) == 0
    kept = (top >= kth) & ((before < p) | first)  # the most likely token always stays, also when top_p rounds to 0
    cut = top.masked_fill(~kept, inf).amin(dim=-1, keepdim=True)
    return torch.where((k > 0) | (p < 1.0), cut, -inf)


# Odd constants of splitmix64 (Steele et al.) and of Wellons' "lowbias32" hash, as the signed integers they wrap to.
GOLDEN64 = 0x9E3779B97F4A7C15 - 2**64
MIX64 = (0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64)
GOLDEN32 = 0x9E3779B9 - 2**32
MIX32 = (0x7FEB352D, 0x846CA68B - 2**32)


def gumbel_noise(seed: Tensor, position: Tensor, vocab: int) -> Tensor:
    """(B, V) float32 standard Gumbel noise; entry (b, v) is a function of (seed[b], position[b], v) alone.

    A counter-based generator in integer tensor ops (products wrap around, as in C): splitmix64 hashes each row's
    (seed, position) to a 32-bit key, and lowbias32 hashes key + v * golden ratio (distinct for every v) to the
    entry's bits, 31 of which `gumbel_of` turns into the noise."""
    z = _mix64(seed * GOLDEN64 + position)
    key = (z >> 32).to(torch.int32)  # the high half: (B,)
    x = torch.arange(vocab, dtype=torch.int32, device=seed.device) * GOLDEN32 + key[:, None]
    x = x ^ _shift(x, 16, 32)
    x = x * MIX32[0]
    x = x ^ _shift(x, 15, 32)
    x = x * MIX32[1]
    x = x ^ _shift(x, 16, 32)
    return gumbel_of(_shift(x, 1, 32))


def gumbel_of(bits: Tensor) -> Tensor:
    """Standard Gumbel noise from uniform int32 `bits` in [0, 2**31): v = (bits + 0.5) / 2**31 in (0, 1), and
    g = -log(-log(1 - v)). The largest g is what the smallest v allows, 22.2, so a token up to ~22 nats below the top
    is drawn at its rate (a u = 1 - v of 23 bits, all float32 holds near 1, capped g at 16.6: the far tail of a large
    vocabulary was drawn too rarely)."""
    # float32 holds a small v exactly; one within 2**-25 of 1 rounds to 1 (log1p(-1) = -inf), hence the clamp
    v = ((bits.float() + 0.5) * 2.0**-31).clamp(max=1 - 2.0**-24)
    return -torch.log(-torch.log1p(-v))


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64: a bijection whose every output bit depends on every input bit."""
    z = (z ^ _shift(z, 30, 64)) * MIX64[0]
    z = (z ^ _shift(z, 27, 64)) * MIX64[1]
    return z ^ _shift(z, 31, 64)


def _shift(x: Tensor, by: int, bits: int) -> Tensor:
    """Logical right shift of signed `bits`-bit integers (torch's `>>` shifts in the sign)."""
    return (x >> by) & ((1 << (bits - by)) - 1)


def greedy(logits: Tensor) -> Tensor:
    """(B, V) -> (B,) index of the first maximum, as `argmax`, from the maxima of blocks of the row, then one block's
    argmax: on CPU `argmax` over 100k entries is a scalar loop (the blocks take a third of its time), and compiled
    for a GPU, inductor reduces an argmax in one thread block per row (a share of a decoding step on an H200,
    docs/benchmarks.md), where the block maxima spread over B x 149. Eager on a GPU torch's own argmax kernel
    spreads already, in one launch instead of several."""
    B, V = logits.shape
    blocks = row_blocks(V)
    if (logits.device.type != "cpu" and not torch.compiler.is_compiling()) or V % blocks:
        return logits.argmax(dim=-1)
    # Several rows of `output_logits` come as a transposed view (stride (1, B)): reducing along its rows strides
    # through memory, far slower than one contiguous copy first.
    grid = logits.contiguous().view(B, blocks, V // blocks)
    block = grid.amax(dim=-1).argmax(dim=-1)  # (B,) first block holding the maximum
    within = grid[torch.arange(B, device=logits.device), block].argmax(dim=-1)  # first position inside it
    return block * (V // blocks) + within
