"""The decoding engine: continuous batching over a KV cache of slots, one owner, no global state.

An `Engine` holds a KV cache of `max_batch` rows (slots). A request (prompt ids + `SamplingParams`) waits in a queue
until a slot is free, is prefilled into its slot (its first token comes from the prefill; requests admitted at one
step are prefilled together, `prefill_rows`), and then decodes one token per `step()` together with every other
running request; it leaves when it produces one of its stop ids, reaches its `max_new_tokens`, or is cancelled, and
the next waiting request takes the slot at once. Each slot has its own fill level and positions (`KVCache`), so
requests of any lengths, joined at any step, share one batched forward per token. Each request samples with its own
parameters and seed, all rows in one batched pick on the device (axiom/infer/sampling.py) whose draws depend on a
row's own seed and position only. The cache is allocated once: max_batch x max_len slots per layer for keys and
values.

Two ways to run a step:
- dynamic (default): eager, over the running rows only (they are kept in rows 0..n-1: a leaving request's row
  is filled by the last one), attending over the filled slots; rows filled alike need no mask at all.
- static (`static=True`; `compile=True` implies it): every shape fixed (all `max_batch` rows, all `max_len`
  slots under a mask; compiled on a GPU, a block mask that reads each row's filled blocks alone), so `compile` can
  run the step through torch.compile, with CUDA graphs on a GPU, launched one step ahead of the host
  (axiom/infer/compiled.py); the idle rows decode padding that nobody reads. A request keeps its row while it runs:
  one that leaves frees its row and nothing is copied (a GPU step had spent 48 cache copies on each leave).
  Compiling costs seconds on first use per shape (max_batch, max_len); a later engine of the same shape reuses the
  compiled code (on a GPU it records its CUDA graphs afresh).

The caches and compiled steps belong to the engine: two engines on one model never share state, and one engine
must be driven from one thread (axiom/infer/serve.py runs it in its own thread; axiom.infer.generate.stream steps it
inline).
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from axiom.infer.compiled import CompiledStep, Landing
from axiom.infer.sampling import MIN_TEMPERATURE, RowSampling, greedy, pick
from axiom.model.cache import KVCache
from axiom.model.transformer import Axiom
from axiom.text.tokenizer import outside_vocabulary

SEED_RANGE = (-(2**63), 2**64)  # 64 bits, signed or unsigned; the draws take a seed modulo 2**64
NO_TOP_K = (0, -1)  # top_k values that mean none, as vLLM and transformers read them
NON_FINITE = "the model's logits are not finite (NaN or inf) for this prompt"
# Prompts admitted together are prefilled in one forward per group of neighbouring rows (`prefill_groups`):
# at most this many tokens, padding included (it bounds the forward's activations) ...
PREFILL_TOKENS = 4096
# ... and at most a quarter of them padding, or this many padding tokens in a group this small.
PREFILL_SLACK = 64


def decode_one(model: Axiom, ids: Tensor, cache: KVCache) -> Tensor:
    """(B,) newest tokens -> (B, V) logits of the next position; the cache advances by one slot."""
    return model(ids[:, None], cache=cache, last_only=True)[:, -1]


def default_eager(device: torch.device) -> bool:
    """Whether decoding on `device` takes the eager path unless told (`axiom generate`, `axiom chat`, `axiom bench
    generate`): on CPU the dynamic cache's eager fast path, faster there than the compiled step and with nothing to
    compile (docs/benchmarks.md, "The bench times what users run"); on CUDA the compiled step, one CUDA graph per
    token, compiled on a machine's first run and loaded from `compile_cache_dir()` after."""
    return device.type != "cuda"


def decoding_path(eager: bool) -> str:
    """The path a decoding command takes, in words."""
    return "eager (dynamic cache)" if eager else "compiled (static cache; CUDA graphs on a GPU)"


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 (or any below MIN_TEMPERATURE) is greedy; a top_k of 0 or -1 is none
    (as in vLLM and transformers); `seed` fixes the request's draws (None: a random seed); the request stops after
    any of `stop_ids` (kept in its tokens) or `max_new_tokens` tokens."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.top_k in NO_TOP_K:
            object.__setattr__(self, "top_k", None)  # frozen: the one spelling of "no top-k" the rest reads

    def problem(self) -> tuple[str, str] | None:
        """The first parameter out of range as (field name, what is wrong), or None."""
        if self.max_new_tokens <= 0:
            return "max_new_tokens", "must be at least 1"
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            return "temperature", "must be 0 (greedy) or positive and finite"
        if self.top_k is not None and self.top_k <= 0:
            return "top_k", "must be at least 1, or 0 or -1 for none"
        if self.top_p is not None and not 0 < self.top_p <= 1:
            return "top_p", "must lie in (0, 1]"
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            return "seed", "must fit in 64 bits (-2**63 to 2**64 - 1)"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


PADDING = SamplingParams(temperature=0.0)  # what an idle row of a static step samples with: greedily, unread


@dataclass(eq=False)
class Request:
    """One prompt's decoding: its new `tokens` so far, and once finished a `finish_reason`: "stop" (a stop id,
    kept as the last token), "length" (max_new_tokens, or the cache's max_len), "cancelled", or "error" (its
    prefill or its row of a step failed, e.g. non-finite logits: `error` says why)."""

    id: int
    prompt: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_new_tokens, capped so that the prompt and its tokens fit the cache
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int = 0  # of its draws: params.seed, or a random one
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class Engine:
    """Continuous batching for one model; see the module docstring.

    engine = Engine(model, max_batch=8)
    a = engine.submit(prompt_ids, SamplingParams(max_new_tokens=50, temperature=0))
    while engine.has_work():
        for request, token in engine.step():
            ...  # request.tokens grows; request.done once it finished
    """

    def __init__(
        self,
        model: Axiom,
        max_batch: int = 8,
        max_len: int | None = None,
        static: bool = False,
        compile: bool = False,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.static = static or compile
        self.compile = compile
        param = next(model.parameters())
        self.device = param.device
        self.cache = KVCache.empty(model.cfg, max_batch, self.max_len, self.device, param.dtype, static=self.static)
        self._graph = CompiledStep(model, self.cache) if compile else None
        # the step the compiled path launched and has not read: its requests, their rows, where its ids arrive
        self._in_flight: tuple[list[Request], list[int], Landing] | None = None
        self.running: list[Request] = []
        # running[i] holds cache row rows[i]: 0..n-1 in a dynamic cache (a leaving request's row is refilled by the
        # last one), fixed for a request's life in a static one
        self.rows: list[int] = []
        self.waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._views: dict[int, KVCache] = {}
        self._sampling: tuple[tuple, RowSampling] | None = None  # (key, parameters) of the rows last picked
        self._live: tuple[tuple[int, ...], Tensor] | None = None  # (rows, a (max_batch,) 1/0 mask of them)

    def submit(self, prompt: list[int], params: SamplingParams) -> Request:
        """Queue a request; it joins the batch at the next `step()` with a free slot. ValueError for an empty
        prompt, one that leaves no slot to decode into, or parameters out of range."""
        problem = params.problem()
        if problem:
            raise ValueError(f"{problem[0]} {getattr(params, problem[0])}: {problem[1]}")
        if not prompt:
            raise ValueError("the prompt needs at least one token")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room under max_len={self.max_len}")
        if problem := outside_vocabulary(prompt, self.model.cfg.vocab_size):
            raise ValueError(problem)
        budget = min(params.max_new_tokens, self.max_len - len(prompt))  # the text stays within max_len
        seed = secrets.randbits(63) if params.seed is None else params.seed
        request = Request(next(self._ids), list(prompt), params, budget, seed=seed)
        self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop a request now (waiting or running) and free its slot; a finished one is left as it is."""
        if request.done:
            return
        if request in self.waiting:
            self.waiting.remove(request)
        else:
            self._leave(self.running.index(request))
        request.finish_reason = "cancelled"

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int | None]]:
        """One token for every running request, then prefill waiting requests into the free slots (each gets its
        first token); finished requests leave. Returns the (request, token) pairs produced, in order, and
        (request, None) for a request that failed in this step (its prefill raised, or its logits were not
        finite): it alone leaves, with finish_reason "error" and its `error`; the other rows go on unchanged.
        Compiled, the tokens of a decoding step come with the next call, which launches the step after it first
        (axiom/infer/compiled.py)."""
        produced: list[tuple[Request, int | None]] = []
        if self._graph is not None:
            self._step_ahead(produced)
        elif self.running:
            last = [r.tokens[-1] for r in self.running]
            for request, token in zip(list(self.running), self._decode(last), strict=True):
                self._record(request, token, produced)
        admitted, rows = self._admit()
        # Every group is prefilled before a first token is recorded: a request that ends there leaves its row, into
        # which a dynamic cache moves the last running request, which must have been prefilled by then.
        groups = prefill_groups(admitted, rows)
        firsts = [pair for group in groups for pair in zip(group, self._prefill(group), strict=True)]
        for request, token in firsts:
            self._record(request, token, produced)
        return produced

    def _step_ahead(self, produced: list[tuple[Request, int | None]]) -> None:
        """Launch the next compiled step of the running requests, then read the step the previous call launched and
        record its tokens (those of requests that left meanwhile are dropped). A request whose budget ends with that
        step is not launched again."""
        before, self._in_flight = self._in_flight, None
        ahead = set(before[0]) if before else set()
        launch = [
            (request, row)
            for request, row in zip(self.running, self.rows, strict=True)
            if request not in ahead or len(request.tokens) + 1 < request.max_new_tokens
        ]
        if launch:
            requests, rows = [r for r, _ in launch], [row for _, row in launch]
            if len(rows) < self.max_batch:
                self.cache.positions.mul_(self._live_rows(rows))  # the idle rows back to slot 0
            greedy_only = all(r.params.greedy for r in requests)
            sampling = None if greedy_only else self._row_sampling(requests, rows, self.max_batch)
            self._in_flight = (requests, rows, self._graph.launch(sampling))
        if before:
            requests, rows, landing = before
            every = landing.read()
            for request, row in zip(requests, rows, strict=True):
                if not request.done:  # it may have left since: a stop id read last call, a cancel
                    self._record(request, _checked(every[row], request), produced)

    def _admit(self) -> tuple[list[Request], list[int]]:
        """Move the oldest waiting requests into the free rows, shortest prompt in the lowest row, so that prompts of
        similar lengths lie in neighbouring rows (`prefill_groups`). Returns them and their rows, in row order."""
        free = sorted(set(range(self.max_batch)) - set(self.rows))  # a dynamic cache's are n..max_batch-1
        admitted = [self.waiting.popleft() for _ in range(min(len(free), len(self.waiting)))]
        admitted.sort(key=lambda r: len(r.prompt))
        self.running += admitted
        self.rows += free[: len(admitted)]
        return admitted, free[: len(admitted)]

    def _prefill(self, group: list[Request]) -> list[int | None]:
        """Prefill `group` (running requests in neighbouring rows) in one forward (`prefill_rows`). Returns each
        request's first token, or None for one whose prefill failed: a group whose forward raises (out of memory) is
        retried one request at a time, so that a prompt too long for memory fails alone."""
        start = self.rows[self.running.index(group[0])]
        try:
            logits = prefill_rows(self.model, self.cache, start, [r.prompt for r in group])
        except Exception as e:
            if len(group) > 1:
                return [token for request in group for token in self._prefill([request])]
            group[0].error = f"its prefill failed ({type(e).__name__}: {e})"
            return [None]
        tokens = self._pick(logits, group)
        if self._graph is not None:
            self._graph.feed(start, tokens)
        return tokens

    def _record(self, request: Request, token: int | None, produced: list[tuple[Request, int | None]]) -> None:
        produced.append((request, token))
        if token is None:
            self._fail(request)
        else:
            self._append(request, token)

    def _fail(self, request: Request) -> None:
        """End a request whose row failed and free the row, zeroed first: a masked slot still meets a zero
        attention weight, and 0 * NaN is NaN, so NaN keys left behind would spoil the row's next request."""
        i = self.running.index(request)
        for t in (*self.cache.keys, *self.cache.values):
            t[self.rows[i]].zero_()
        request.finish_reason = "error"
        self._leave(i)

    def _append(self, request: Request, token: int) -> None:
        """Record a new token; a finished request leaves its slot."""
        request.tokens.append(token)
        if token in request.params.stop_ids:
            request.finish_reason = "stop"
        elif len(request.tokens) >= request.max_new_tokens:
            request.finish_reason = "length"
        else:
            return
        self._leave(self.running.index(request))

    def _leave(self, i: int) -> None:
        """Free the row of running request i. Static: the row is left as it is, to decode padding until a request
        takes it. Dynamic: the last running request moves into it (its filled slots copied), so that the running
        requests stay in rows 0..n-1 and a dynamic step works on views, never on gathered copies."""
        if self.static:
            self.rows.pop(i)
            self.running.pop(i)
            return
        last = len(self.running) - 1
        if i != last:
            n = self.cache.lengths[last]
            for t in (*self.cache.keys, *self.cache.values):
                t[i, :, :n].copy_(t[last, :, :n])
                # the moved row may be one failing in this same step: NaN left in the freed row would spoil the
                # next request to take it (see `_fail`)
                t[last, :, :n].zero_()
            self.cache.lengths[i] = n
        self.running[i] = self.running[last]
        self.running.pop()
        self.rows.pop()
        self.cache.lengths[last] = 0

    def _decode(self, last: list[int]) -> list[int | None]:
        """One batched decoding step of the running requests from their newest tokens; None for a request whose
        row failed (see `_pick`)."""
        n = len(self.running)
        rows = self.running
        if not self.static:
            if n not in self._views:
                self._views[n] = self.cache.rows(0, n)
            view = self._views[n]
            view.lengths = self.cache.lengths[:n]
            logits = decode_one(self.model, torch.tensor(last, device=self.device), view)
            self.cache.lengths[:n] = [length + 1 for length in self.cache.lengths[:n]]
            return self._pick(logits, rows)
        # Static: every row steps; idle ones decode token 0 at slot 0, which no running request reads.
        tokens = [0] * self.max_batch
        for row, token in zip(self.rows, last, strict=True):
            tokens[row] = token
        ids = torch.tensor(tokens, device=self.device)
        if n < self.max_batch:
            self.cache.positions.mul_(self._live_rows(self.rows))  # the idle rows back to slot 0
        return self._pick(decode_one(self.model, ids, self.cache)[self.rows], rows)

    def _pick(self, logits: Tensor, rows: list[Request]) -> list[int | None]:
        """(n, V) logits -> the next token of each of the n requests, each with its own sampling parameters, in one
        batched pick on the device; only the ids come back. A row whose picked logit is not finite (NaN or inf: a
        model that overflows on some input) gets None: its pick would be noise."""
        if all(r.params.greedy for r in rows):
            picked = greedy(logits)
        else:
            positions = torch.tensor([len(r.prompt) + len(r.tokens) for r in rows]).to(self.device)
            picked = pick(logits, self._row_sampling(rows, range(len(rows)), len(rows)), positions)
        finite = torch.isfinite(logits.gather(1, picked[:, None])[:, 0])
        every = torch.where(finite, picked, -1).tolist()
        return [_checked(token, request) for token, request in zip(every, rows, strict=True)]

    def _row_sampling(self, requests: list[Request], rows: Sequence[int], size: int) -> RowSampling:
        """The sampling parameters of `requests` at `rows` of `size` rows on the device, the others greedy; built
        again only when the requests or their rows change, not every step."""
        key = (size, *zip(rows, (r.id for r in requests), strict=True))
        if self._sampling is None or self._sampling[0] != key:
            params: list[SamplingParams] = [PADDING] * size
            seeds = [0] * size
            for row, request in zip(rows, requests, strict=True):
                params[row], seeds[row] = request.params, request.seed
            self._sampling = (key, RowSampling.of(params, seeds, size, self.device))
        return self._sampling[1]

    def _live_rows(self, rows: list[int]) -> Tensor:
        """(max_batch,) int64 on the device: 1 at `rows` (those a step decodes), 0 at the idle ones; built again only
        when the rows change."""
        key = tuple(rows)
        if self._live is None or self._live[0] != key:
            live = torch.zeros(self.max_batch, dtype=torch.long)
            live[list(key)] = 1
            self._live = (key, live.to(self.device))
        return self._live[1]


def prefill_groups(admitted: list[Request], rows: list[int]) -> list[list[Request]]:
    """`admitted` requests at `rows` (shortest prompt first, in row order) cut into groups that one forward prefills
    (`prefill_rows`): requests in neighbouring rows, at most PREFILL_TOKENS tokens once padded to the group's longest
    prompt, at most a quarter of them padding (or PREFILL_SLACK tokens: below that a forward costs about the same
    either way)."""
    groups: list[list[tuple[Request, int]]] = []
    for request, row in zip(admitted, rows, strict=True):
        group = groups[-1] if groups else []
        padded = len(request.prompt) * (len(group) + 1)  # shortest first: this one is the group's longest
        padding = padded - sum(len(r.prompt) for r, _ in group) - len(request.prompt)
        if (
            group
            and row == group[-1][1] + 1
            and padded <= PREFILL_TOKENS
            and padding <= max(padded // 4, PREFILL_SLACK)
        ):
            group.append((request, row))
        else:
            groups.append([(request, row)])
    return [[request for request, _ in group] for group in groups]


def prefill_rows(model: Axiom, cache: KVCache, start: int, prompts: list[list[int]]) -> Tensor:
    """Fill rows start.. of `cache` with `prompts` in one forward and return each one's next-token logits (n, V).
    Each prompt is padded at its end to the longest: its tokens never attend to the padding after them, and the
    padding's slots lie beyond the row's fill level (set to the prompt's own length), zeroed: a masked slot still
    meets a zero attention weight, and 0 * NaN is NaN."""
    n, device = len(prompts), cache.keys[0].device
    lengths = [len(p) for p in prompts]
    view = cache.rows(start, n)
    # the rows as a dynamic cache filled alike from slot 0: causal attention over the prompts alone, where a static
    # cache would attend over all max_len slots under a mask
    fresh = KVCache(view.keys, view.values, [0] * n)
    longest = max(lengths)
    x = model.hidden_states(torch.tensor([p + [0] * (longest - len(p)) for p in prompts], device=device), cache=fresh)
    last = torch.tensor(lengths, device=device) - 1  # each prompt's last position
    logits = model.logits(x[torch.arange(n, device=device), last][:, None])[:, 0]
    if cache.static:  # its fill levels are on the device
        view.positions.copy_(last + 1)
    else:
        cache.lengths[start : start + n] = lengths
    if min(lengths) < longest:
        padding = torch.arange(longest, device=device) > last[:, None]  # (n, longest)
        for t in (*view.keys, *view.values):
            t.narrow(2, 0, longest).masked_fill_(padding[:, None, :, None], 0)
    return logits


def _checked(token: int, request: Request) -> int | None:
    """A row's picked id, or None (and an `error` on its request) where it is -1: the row was not finite."""
    if token >= 0:
        return token
    request.error = NON_FINITE
    return None
