"""Sampling: prefill the prompts into a KV cache, then decode one token at a time."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from axiom.model import Axiom, KVCache, output_logits, row_blocks


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
        return greedy(logits)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def greedy(logits: Tensor) -> Tensor:
    """(B, V) -> (B,) index of the first maximum, as `argmax`. On CPU `argmax` over 100k entries is a scalar loop
    (~50 us); the vectorised block maxima, then one block's argmax, give the same index in ~15 us."""
    B, V = logits.shape
    blocks = row_blocks(V)
    if logits.device.type != "cpu" or V % blocks:
        return logits.argmax(dim=-1)
    grid = logits.reshape(B, blocks, V // blocks)
    block = grid.amax(dim=-1).argmax(dim=-1)  # (B,) first block holding the maximum
    within = grid[torch.arange(B, device=logits.device), block].argmax(dim=-1)  # first position inside it
    return block * (V // blocks) + within


def decode_one(model: Axiom, ids: Tensor, cache: KVCache) -> Tensor:
    """(B,) newest tokens -> (B, V) logits of the next position; the cache advances by one slot."""
    return model(ids[:, None], cache=cache, last_only=True)[:, -1]


def decode_one_and_hidden(model: Axiom, ids: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
    """`decode_one`, plus the final hidden states (B, 1, d) as a second output: what gets compiled. A graph
    output is stored once; otherwise inductor inlines the final norm into its loop over the output layer's
    rows and recomputes it for each of the V rows (0.28 -> 0.23 ms per token on tiny, docs/benchmarks.md)."""
    x = model.hidden_states(ids[:, None], cache=cache, last_only=True)
    return output_logits(x, model.lm_head.weight)[:, -1], x


def decode_greedy(model: Axiom, ids: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
    """`decode_one_and_hidden` with the greedy pick: (B,) next ids and the hidden states. Compiled, the pick
    runs inside the graph (~25 us less per token on tiny than `greedy` after it)."""
    logits, x = decode_one_and_hidden(model, ids, cache)
    return greedy(logits), x


_static_caches: weakref.WeakKeyDictionary[Axiom, KVCache] = weakref.WeakKeyDictionary()
_compiled: dict[Callable, Callable] = {}


def static_cache(model: Axiom, pad: Tensor) -> KVCache:
    """An emptied static cache of max_seq_len slots for len(pad) rows, `pad` copied in.

    One per model, reused while the batch size, dtype and device stay the same: a compiled decoding step
    is specialised to the cache's tensors (their addresses are what CUDA graphs replay), so a fresh cache
    per call would mean a fresh compilation per call."""
    device, dtype = pad.device, next(model.parameters()).dtype
    cache = _static_caches.get(model)
    if cache is None or cache.pad.shape != pad.shape or cache.keys[0].dtype != dtype or cache.pad.device != device:
        cache = KVCache.empty(model.cfg, len(pad), model.cfg.max_seq_len, device, dtype, pad.clone(), static=True)
        for t in (*cache.keys, *cache.values, cache.pad, cache.position):
            torch._dynamo.mark_static_address(t)
        _static_caches[model] = cache
    cache.pad.copy_(pad)
    cache.position.zero_()  # stale keys and values beyond the position stay masked
    return cache


def compiled(step: Callable) -> Callable:
    """A decoding step through torch.compile: fused kernels, and CUDA graphs on a GPU ("reduce-overhead"),
    which replay a whole step with one launch. Built on first use; compiles per model and batch shape."""
    if step not in _compiled:
        _compiled[step] = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    return _compiled[step]


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
    static: bool = False,
    compile: bool = False,
) -> Iterator[Tensor]:
    """Yield (B,) new token ids step by step; rows that produced `eos_id` keep yielding it.

    Prompts of different lengths are left-padded; the cache masks the padding. `static` decodes with a
    fixed-shape cache (see `static_cache`); `compile` runs each step compiled and implies `static`.
    The default, a dynamic cache in eager mode, starts at once; `compile` costs seconds of compilation first and
    then decodes faster (about 1.7x on CPU for `tiny`, docs/benchmarks.md), which pays over long or repeated runs.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts)
    total = min(longest + max_new_tokens, model.cfg.max_seq_len)
    if longest >= total:
        raise ValueError(f"prompt of {longest} tokens leaves no room under max_seq_len={model.cfg.max_seq_len}")
    pad = torch.tensor([longest - len(p) for p in prompts], device=device)
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    if static or compile:
        cache = static_cache(model, pad)
    else:
        dtype = next(model.parameters()).dtype
        cache = KVCache.empty(model.cfg, len(prompts), total, device, dtype, pad if pad.any() else None)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    def advance(ids: Tensor) -> Tensor:
        """One decoding step: the newest (B,) ids in, the next ones out."""
        if not compile:
            return sample(decode_one(model, ids, cache), temperature, top_k, top_p, generator)
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        if temperature <= 0:  # cloned: a CUDA graph's outputs are overwritten by its next replay
            return compiled(decode_greedy)(model, ids, cache)[0].clone()
        return sample(compiled(decode_one_and_hidden)(model, ids, cache)[0], temperature, top_k, top_p, generator)

    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    logits = model(tokens, cache=cache, last_only=True)[:, -1]  # prefill
    next_ids = sample(logits, temperature, top_k, top_p, generator)
    for n in range(1, total - longest + 1):
        if eos_id is not None:
            next_ids = next_ids.masked_fill(done, eos_id)
            done |= next_ids == eos_id
        yield next_ids
        if n == total - longest or (eos_id is not None and bool(done.all())):
            return
        next_ids = advance(next_ids)


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
