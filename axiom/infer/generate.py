"""Sampling a batch of prompts in step: `stream` and `generate`, thin users of the decoding engine.

How decoding works (axiom/infer/engine.py): each prompt becomes a request in an `Engine`, which prefills it into its
own KV-cache slot (in one forward with the prompts admitted beside it) and then decodes all running requests one
token per step in one batched forward, each with its own sampling parameters and seed. `stream` submits every
prompt, steps the engine and yields the new tokens row by row in step; `generate` collects them. Without an `engine`
argument each call builds its own (nothing is kept between calls); a caller that decodes repeatedly (a chat loop, a
benchmark, a server) builds one `Engine` and passes it, so its cache and compiled steps are reused.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from axiom.errors import AxiomError
from axiom.infer.engine import Engine, SamplingParams
from axiom.model.transformer import Axiom


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
    engine: Engine | None = None,
) -> Iterator[Tensor]:
    """Yield (B,) new token ids step by step; rows that produced `eos_id` keep yielding it.

    Every prompt gets the same number of new tokens: `max_new_tokens`, capped so that the longest prompt and its
    tokens fit in max_seq_len. Prompt i samples with seed `seed + i`, so a row's draws do not depend on the
    other rows (its logits do by rounding in bfloat16 and int8, where a batch's products take other kernels than
    one row's: a sampled token near a tie may differ). `static` decodes with a fixed-shape cache; `compile` runs
    each step compiled and implies `static` (see axiom/infer/engine.py). The default, a dynamic cache in eager
    mode, starts at once; `compile` spends a while compiling first and then decodes faster (docs/benchmarks.md),
    which pays over long or repeated runs with one `engine`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    total = min(longest + max_new_tokens, model.cfg.max_seq_len)
    if longest >= total:
        raise ValueError(f"prompt of {longest} tokens leaves no room under max_seq_len={model.cfg.max_seq_len}")
    if engine is None:
        # A dynamic cache needs only the slots this call fills; a static one keeps max_seq_len, the shape a
        # compiled step is specialised to.
        max_len = None if static or compile else total
        engine = Engine(model, max_batch=len(prompts), max_len=max_len, static=static, compile=compile)
    stop = (eos_id,) if eos_id is not None else ()
    requests = [
        engine.submit(p, SamplingParams(total - longest, temperature, top_k, top_p, _seed(seed, i), stop))
        for i, p in enumerate(prompts)
    ]
    try:
        for n in range(total - longest):
            while any(len(r.tokens) <= n and not r.done for r in requests):
                engine.step()
            if failed := next((r for r in requests if r.error), None):
                raise AxiomError(f"decoding failed: {failed.error}")
            if all(len(r.tokens) <= n for r in requests):  # every row stopped at eos_id
                return
            yield torch.tensor([r.tokens[n] if len(r.tokens) > n else eos_id for r in requests])
    finally:  # a caller that stops early frees the slots of a shared engine
        for r in requests:
            engine.cancel(r)


def _seed(seed: int | None, row: int) -> int | None:
    return None if seed is None else seed + row


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
