"""A static engine's compiled decoding step (axiom/infer/engine.py), launched one step ahead of the host.

Compiled, a step runs through torch.compile, with CUDA graphs on a GPU (`step_options`): the whole model and each
row's pick replay as one graph launch, and only the (B,) new ids leave it. On an H200 the host of such a step of
axiom-380m at batch 1 spent about half the step's kernel time launching the graph while the GPU idled, then waited
for the ids (docs/benchmarks.md, "The decoding step measured on an H200"). So the engine launches step n+1 before it
reads step n's ids: a step's input ids never leave the device (each step copies its picks into the buffer the next
one reads, and a prefill writes its first tokens there), and its ids come back through pinned memory behind an
event, so reading them waits for that step alone while the next one runs. The host learns each token one step
late: a request that stops on a stop id has decoded one more token in the step in flight, which nobody reads, and a
request whose budget ends with the step in flight is not launched again (no row writes past max_len).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from axiom.infer.sampling import RowSampling, greedy, pick
from axiom.model.cache import KVCache
from axiom.model.transformer import Axiom, flex_decoding, stop_flex_decoding
from axiom.runtime import compile_cache_dir, persistent_compile_cache


def step_options(batch: int) -> dict[str, bool]:
    """The inductor options of a step over `batch` rows: CUDA graphs (those of mode="reduce-overhead"), and at batch 1
    coordinate-descent tuning of each Triton kernel's launch settings, with which inductor computes a product of one
    row as a fused reduction instead of calling cuBLAS (gpt-fast's setting). cuBLAS read a layer's weights at batch 1
    on an H200 at a fifth of the card's bandwidth (docs/benchmarks.md). Tuning
    compiles and times variants of every kernel, a longer first compile, so batches of more rows, whose products
    stay cuBLAS's, go without it. Neither option changes anything on a CPU."""
    return {"triton.cudagraphs": True, "coordinate_descent_tuning": batch == 1}


# Dynamo's recompile limit once a compiled step exists (see `raise_recompile_limit`): room for the variants of ~20
# engines of other models, dtypes or shapes in one process, and still a stop for a step that would recompile at every
# call.
RECOMPILE_LIMIT = 64


def decode_one_and_hidden(model: Axiom, ids: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
    """(B,) newest tokens -> (B, V) logits of the next position, plus the final hidden states (B, 1, d) as a second
    output: a graph output is stored once; otherwise inductor inlines the final norm into its loop over the output
    layer's rows and recomputes it for each of the V rows (docs/benchmarks.md)."""
    x = model.hidden_states(ids[:, None], cache=cache, last_only=True)
    return model.logits(x)[:, -1], x


def decode_greedy(model: Axiom, ids: Tensor, cache: KVCache) -> tuple[Tensor, Tensor]:
    """One greedy step of every row from its next input id `ids`, which it overwrites with the picks: the (B,) ids
    to hand out (`handed_out`) and the hidden states. Compiled, the pick, the check and the overwrite run inside
    the graph and only the ids leave it (docs/benchmarks.md)."""
    logits, x = decode_one_and_hidden(model, ids, cache)
    return handed_out(greedy(logits), ids, x), x


def decode_sampled(model: Axiom, ids: Tensor, cache: KVCache, rows: RowSampling) -> tuple[Tensor, Tensor]:
    """`decode_greedy` with each row's own pick (axiom/infer/sampling.py). Its draws are numbered by the static
    cache's fill levels after the step: each row's text position of the drawn token, as the eager pick numbers
    them."""
    logits, x = decode_one_and_hidden(model, ids, cache)
    return handed_out(pick(logits, rows, cache.positions), ids, x), x


def handed_out(picked: Tensor, ids: Tensor, x: Tensor) -> Tensor:
    """Make `picked` the rows' next input ids, in place, and return it with -1 where a row's hidden states are not
    finite (no logits leave the graph, so they are what is checked): the next step still gets a valid id."""
    ids.copy_(picked)
    return torch.where(torch.isfinite(x).all(dim=-1)[:, 0], picked, -1)


@dataclass
class Landing:
    """Where a launched step's ids arrive: host memory (pinned on a GPU, so that the copy is asynchronous) and, on a
    GPU, the event recorded after the copy."""

    ids: Tensor
    ready: torch.cuda.Event | None

    def read(self) -> list[int]:
        """Each row's picked id, -1 where the row's hidden states were not finite; waits for its step alone."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.ids.tolist()


class CompiledStep:
    """The compiled step over every row of a static `cache`; `launch` queues one and returns at once."""

    def __init__(self, model: Axiom, cache: KVCache):
        self.model, self.cache = model, cache
        batch, device = cache.positions.shape[0], cache.positions.device
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)  # each row's next input id
        raise_recompile_limit(RECOMPILE_LIMIT)
        for t in (*cache.keys, *cache.values, cache.positions, self.ids):  # CUDA graphs replay their addresses
            torch._dynamo.mark_static_address(t)
        cuda = device.type == "cuda"
        # two, in turn: the step just launched lands in one while the step before it is read from the other
        self._landings = [
            Landing(torch.zeros(batch, dtype=torch.long, pin_memory=cuda), torch.cuda.Event() if cuda else None)
            for _ in range(2)
        ]
        self._compiled: dict[Callable, Callable] = {}
        # compiled once per machine: later engines and runs load the compiled steps from this folder
        self._compile_cache = compile_cache_dir()

    def feed(self, start: int, tokens: list[int | None]) -> None:
        """Make `tokens` the next input of rows start.. (prefilled requests' first tokens; None: a failed row)."""
        self.ids[start : start + len(tokens)] = torch.tensor([t or 0 for t in tokens], device=self.ids.device)

    def launch(self, sampling: RowSampling | None) -> Landing:
        """Queue one step of every row from its next input id, greedy or with each row's `sampling`; its picks
        become the rows' next inputs on the device. Returns where its ids will arrive."""
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were copied out
        if sampling is None:
            picked, _ = self._run(decode_greedy, self.model, self.ids, self.cache)
        else:
            picked, _ = self._run(decode_sampled, self.model, self.ids, self.cache, sampling)
        landing = self._landings[0]
        self._landings.reverse()
        landing.ids.copy_(picked, non_blocking=True)
        if landing.ready is not None:  # on the stream of the ids' GPU, which need not be the current GPU
            landing.ready.record(torch.cuda.current_stream(self.ids.device))
        return landing

    def _run(self, step: Callable, *args) -> tuple[Tensor, Tensor]:
        """`step(*args)` through torch.compile: fused kernels, and CUDA graphs on a GPU (`step_options`), which
        replay a whole step with one launch. Compiled on first use, inside the call, as is any recompilation: hence
        the compile cache's folder around every call. Static shapes (`dynamic=False`): each engine shape gets kernels
        of its own sizes, where dynamo would otherwise compile the step of a second shape once more for a symbolic
        batch size, kept for every later engine.

        A compile that fails while the step attends through flex_attention (a Triton kernel first built for this
        GPU and torch) is compiled once more through SDPA (`stop_flex_decoding`): nothing ran, as compiling comes
        before running, so the retried step decodes the same tokens."""
        if step not in self._compiled:
            options = step_options(self.ids.shape[0])
            self._compiled[step] = torch.compile(step, options=options, fullgraph=True, dynamic=False)
        with persistent_compile_cache(self._compile_cache):
            try:
                return self._compiled[step](*args)
            except torch._dynamo.exc.TorchDynamoException as error:
                device = self.ids.device
                if not flex_decoding(self.model.cfg, device):
                    raise
                stop_flex_decoding(device.type, error)
                return self._compiled[step](*args)


def raise_recompile_limit(at_least: int) -> None:
    """Raise dynamo's recompile limit to at least `at_least` for the process (a higher one is kept).

    Dynamo counts a code object's compiled variants over the whole process and stops at the limit (8 by default).
    Every engine steps through the same module-level functions (decode_greedy, decode_sampled), so the limit counts
    all engines together: each model, dtype and batch shape adds a variant, decode_sampled one per cut-off, and a
    process that builds several engines (a notebook, the tests) passed it. One shared code object lets later engines
    reuse the compiled steps instead of tracing them again; the limit is raised once, as a compiled step is built,
    not around every step (`config.patch` costs tens of microseconds a call, against a decoding step of one or two
    milliseconds on a GPU)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, at_least)
