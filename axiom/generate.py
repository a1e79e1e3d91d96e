"""Sampling: prefill the prompts into a KV cache, then decode one token at a time."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from axiom.model import Axiom, KVCache


def logits_to_probs(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """(B, V) logits -> (B, V) probabilities after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, V) logits -> (B,) token ids; temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def stream(
    model: Axiom,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
) -> Iterator[Tensor]:
    """Yield (B,) new token ids step by step; rows that produced `eos_id` keep yielding it.

    Prompts of different lengths are left-padded; the cache masks the padding.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    total = min(longest + max_new_tokens, model.cfg.max_seq_len)
    if longest >= total:
        raise ValueError(
            f"prompt of {longest} tokens leaves no room under max_seq_len={model.cfg.max_seq_len}"
        )
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.cfg, len(prompts), total, device, dtype, pad if pad.any() else None)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = model(tokens, cache=cache)[:, -1]  # prefill
    for _ in range(total - longest):
        next_ids = sample(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_ids = next_ids.masked_fill(done, eos_id)
            done |= next_ids == eos_id
        yield next_ids
        if bool(done.all()) or cache.length == total:
            return
        logits = model(next_ids[:, None], cache=cache)[:, -1]


def generate(model: Axiom, prompts: list[list[int]], max_new_tokens: int, **kwargs) -> list[list[int]]:
    """The new tokens of each prompt, cut after its first EOS (kept) when `eos_id` is given."""
    steps = list(stream(model, prompts, max_new_tokens, **kwargs))
    if not steps:
        return [[] for _ in prompts]
    out = torch.stack(steps, dim=1).tolist()
    eos_id = kwargs.get("eos_id")
    if eos_id is not None:
        out = [row[: row.index(eos_id) + 1] if eos_id in row else row for row in out]
    return out
