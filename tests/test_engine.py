"""The decoding engine: requests that join and leave a running batch decode exactly as they would alone, each with
its own sampling parameters, seed, stop ids and budget, in the eager, static and compiled steps; engines and
generators on one model share nothing."""

import collections
import copy
import logging
import random
from dataclasses import replace

import pytest
import torch
from conftest import DEVICES

from axiom.config import get_config
from axiom.errors import AxiomError
from axiom.infer import engine as engine_module
from axiom.infer.compiled import RECOMPILE_LIMIT, Landing
from axiom.infer.engine import Engine, SamplingParams, decode_one
from axiom.infer.generate import generate, stream
from axiom.model.cache import KVCache
from axiom.model.transformer import Axiom

# Untied output layer: a random tied model mostly repeats its last token, which would hide a row that reads
# another row's keys. Here the prompts end alike and continue differently, so any mix-up of slots shows.
SMALL = get_config(
    "tiny",
    [
        "vocab_size=1000",
        "d_model=64",  # head_dim 16: on a GPU the compiled step attends through flex_attention
        "n_layers=2",
        "n_heads=4",
        "n_kv_heads=2",
        "max_seq_len=48",
        "tie_embeddings=false",
    ],
).model
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 11], [12, 13, 14, 11], [11], [7, 7, 7, 7, 7, 7, 7, 7, 11]]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)
# Every kind of sampling in one batch (greedy, temperature only, top-k, top-p alone, both), leaving after different
# numbers of tokens.
MIXED = [
    GREEDY,
    SamplingParams(max_new_tokens=5, temperature=0.8),
    SamplingParams(max_new_tokens=9, temperature=1.0, top_k=40),
    SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9),
    SamplingParams(max_new_tokens=11, temperature=0.9, top_k=20, top_p=0.5),
]


@pytest.fixture(scope="module", params=DEVICES)
def model(request):
    torch.manual_seed(0)
    return Axiom(SMALL).to(request.param).eval()


def test_the_prompts_continue_differently(model):
    runs = [tuple(alone(model, p)) for p in PROMPTS]
    assert len(set(runs)) == len(runs)


def alone(model, prompt, params=GREEDY):
    engine = Engine(model, max_batch=1)
    request = engine.submit(prompt, params)
    while engine.has_work():
        engine.step()
    return request.tokens


def test_a_static_engine_keeps_each_request_in_its_row_when_another_leaves(model):
    """A leaving request frees its row and nothing moves: the others keep their rows and their cached keys, and a
    newcomer takes the free row; each request still decodes what it decodes alone (sampled ones too)."""
    engine = Engine(model, max_batch=3, static=True)
    params = [
        SamplingParams(max_new_tokens=2, temperature=0.0),
        GREEDY,
        replace(MIXED[2], seed=3),
        replace(MIXED[4], seed=4),
    ]
    short, a, b = (engine.submit(p, q) for p, q in zip(PROMPTS[:3], params, strict=False))
    engine.step()  # all three prefilled together, one token each: the shortest prompt in the lowest row
    row = dict(zip(engine.running, engine.rows, strict=True))
    assert [row[r] for r in (a, b, short)] == [0, 1, 2]
    engine.step()  # the short one's second token: it leaves its row
    assert short.done and engine.running == [a, b] and engine.rows == [0, 1]
    filled = len(PROMPTS[2]) + 1  # b's prompt and its first token's keys
    kept = engine.cache.keys[0][1, :, :filled].clone()
    late = engine.submit(PROMPTS[3], params[3])
    engine.step()
    assert engine.running == [a, b, late] and engine.rows == [0, 1, 2]
    assert torch.equal(engine.cache.keys[0][1, :, :filled], kept)
    while engine.has_work():
        engine.step()
    for request, prompt, p in zip((short, a, b, late), PROMPTS, params, strict=False):
        assert request.tokens == alone(model, prompt, p)


def prefill_shapes(model) -> tuple[list[tuple[int, int]], torch.utils.hooks.RemovableHandle]:
    """The (rows, tokens) of every forward of more than one token the model runs, recorded by a hook."""
    shapes = []
    hook = model.embed.register_forward_hook(lambda _, args, __: shapes.append(tuple(args[0].shape)))
    return shapes, hook


@pytest.mark.parametrize("static", [False, True])
def test_prompts_admitted_together_are_prefilled_together_in_groups(model, static, monkeypatch):
    """Shortest prompt first; a group of neighbouring rows ends where padding would pass a quarter of its tokens
    (PREFILL_SLACK) or its padded tokens PREFILL_TOKENS; each prompt still decodes what it decodes alone."""
    monkeypatch.setattr(engine_module, "PREFILL_SLACK", 0)
    engine = Engine(model, max_batch=5, static=static)
    shapes, hook = prefill_shapes(model)
    try:
        requests = [engine.submit(p, GREEDY) for p in PROMPTS]  # lengths 7, 2, 4, 1, 9
        engine.step()
        assert shapes[:3] == [(2, 2), (2, 7), (1, 9)]  # [1, 2] pad 1 of 4, [4, 7] 3 of 14; [.., 9] 7 of 27: too many
        monkeypatch.setattr(engine_module, "PREFILL_SLACK", 64)
        monkeypatch.setattr(engine_module, "PREFILL_TOKENS", 16)
        while engine.has_work():
            engine.step()
        shapes.clear()
        later = [engine.submit(p, GREEDY) for p in PROMPTS]
        engine.step()
        assert shapes[:3] == [(3, 4), (1, 7), (1, 9)]  # [1, 2, 4, 7] would be 4 x 7 = 28 tokens, more than 16
        while engine.has_work():
            engine.step()
    finally:
        hook.remove()
    for request, prompt in zip(requests + later, PROMPTS + PROMPTS, strict=True):
        assert request.tokens == alone(model, prompt), prompt


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("ends_by", ["length", "stop"])
def test_a_request_that_ends_at_its_first_token_leaves_the_later_groups_rows_alone(model, static, ends_by, monkeypatch):
    """The shortest prompt, prefilled first, ends at its first token (max_tokens 1, or a stop id such as EOS) and
    leaves its row before the other two are prefilled together: the last of them, whose row a dynamic cache then
    moves into the freed one, still decodes from its own prompt's keys (it used to be prefilled into its old row and
    to decode from the freed one)."""
    monkeypatch.setattr(engine_module, "PREFILL_SLACK", 0)  # groups by the quarter rule alone: [1], [7, 9]
    engine = Engine(model, max_batch=3, static=static)
    first = alone(model, PROMPTS[3])[0]
    ends = replace(GREEDY, max_new_tokens=1) if ends_by == "length" else replace(GREEDY, stop_ids=(first,))
    shapes, hook = prefill_shapes(model)
    try:
        done_at_once = engine.submit(PROMPTS[3], ends)
        pair = [engine.submit(p, GREEDY) for p in (PROMPTS[0], PROMPTS[4])]
        while engine.has_work():
            engine.step()
    finally:
        hook.remove()
    assert shapes[:2] == [(1, 1), (2, 9)]  # the short prompt alone, then the pair as one group
    assert done_at_once.tokens == [first] and done_at_once.finish_reason == ends_by
    for request, prompt in zip(pair, (PROMPTS[0], PROMPTS[4]), strict=True):
        assert request.tokens == alone(model, prompt), prompt


def test_a_static_engine_prefills_rows_apart_apart(model):
    engine = Engine(model, max_batch=3, static=True)
    one = SamplingParams(max_new_tokens=1, temperature=0.0)
    first = engine.submit(PROMPTS[3], one)  # 1 token: row 0
    middle = engine.submit(PROMPTS[1], GREEDY)  # 2 tokens: row 1
    last = engine.submit(PROMPTS[2], one)  # 4 tokens: row 2
    engine.step()  # the first and the last leave at once
    assert first.done and last.done and engine.rows == [1]
    shapes, hook = prefill_shapes(model)
    try:
        newcomers = [engine.submit(PROMPTS[0], GREEDY), engine.submit(PROMPTS[4], GREEDY)]
        engine.step()
    finally:
        hook.remove()
    assert shapes == [(3, 1), (1, 7), (1, 9)]  # one decoding step of every row, then rows 0 and 2 one at a time
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in (middle, *newcomers)] == [alone(model, p) for p in (PROMPTS[1], PROMPTS[0], PROMPTS[4])]


@pytest.mark.parametrize("static", [False, True])
def test_a_prefill_that_raises_is_retried_alone_and_fails_alone(model, static, monkeypatch):
    """A group's forward that raises (out of memory for one long prompt) is retried one prompt at a time: only the
    prompt that fails alone fails, with the error; the padding slots of a group's shorter rows hold zeros."""
    engine = Engine(model, max_batch=3, static=static)
    forward = model.hidden_states

    def out_of_memory_on(tokens, *args, **kwargs):
        if (tokens == 99).any():
            raise RuntimeError("out of memory (simulated)")
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "hidden_states", out_of_memory_on)
    ok = [engine.submit(p, GREEDY) for p in PROMPTS[:2]]
    bad = engine.submit([1, 99, 2], GREEDY)
    assert [token is None for _, token in engine.step()] == [False, True, False]  # rows of lengths 2, 3, 7
    assert bad.finish_reason == "error" and bad.error == "its prefill failed (RuntimeError: out of memory (simulated))"
    monkeypatch.undo()
    padded = Engine(model, max_batch=2, static=static)
    short, long = padded.submit(PROMPTS[1], GREEDY), padded.submit(PROMPTS[0], GREEDY)
    padded.step()
    assert all(t[0, :, 2:7].eq(0).all() and t[1, :, :7].ne(0).any() for t in padded.cache.keys + padded.cache.values)
    for engine_ in (engine, padded):
        while engine_.has_work():
            engine_.step()
    assert [r.tokens for r in (*ok, short, long)] == [alone(model, p) for p in (*PROMPTS[:2], PROMPTS[1], PROMPTS[0])]


@pytest.mark.parametrize("static", [False, True])
def test_interleaved_static_streams_give_what_each_gives_alone(model, static):
    # Issue 12: two stream(..., static=True) generators on one model shared one module-level cache.
    expected = [generate(model, [p], 10, temperature=0.0, static=static)[0] for p in PROMPTS[:2]]
    a, b = (stream(model, [p], 10, temperature=0.0, static=static) for p in PROMPTS[:2])
    got = [[], []]
    for step_a, step_b in zip(a, b, strict=True):
        got[0].append(int(step_a))
        got[1].append(int(step_b))
    assert got == expected


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("max_batch", [2, 3, 8])
def test_requests_joining_a_running_batch_decode_as_alone(model, static, max_batch):
    expected = [alone(model, p) for p in PROMPTS]
    engine = Engine(model, max_batch=max_batch, static=static)
    requests = [engine.submit(PROMPTS[0], GREEDY)]
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        if steps in (2, 3, 5, 9):  # later requests join mid-flight, some while others wait for a slot
            requests.append(engine.submit(PROMPTS[len(requests)], GREEDY))
        assert len(engine.running) <= max_batch
    assert [r.tokens for r in requests] == expected
    assert all(r.finish_reason == "length" for r in requests)


def test_each_request_samples_with_its_own_parameters_and_seed(model):
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    expected = alone(model, PROMPTS[1], sampled)
    assert expected == alone(model, PROMPTS[1], sampled)  # seeded: reproducible
    engine = Engine(model, max_batch=4)
    others = [engine.submit(p, GREEDY) for p in PROMPTS[2:4]]
    engine.step()
    other_seed = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=1.0, seed=99))
    request = engine.submit(PROMPTS[1], sampled)
    while engine.has_work():
        engine.step()
    assert request.tokens == expected  # greedy rows and another seed beside it change nothing
    assert [r.tokens for r in others] == [alone(model, p) for p in PROMPTS[2:4]]
    assert other_seed.tokens != expected


def mixed_requests(n: int) -> list[tuple[list[int], SamplingParams]]:
    """n requests, no two alike: every prompt with every kind of sampling (up to 25), each with its own seed."""
    return [(PROMPTS[i % 5], replace(MIXED[(i + i // 5) % 5], seed=100 + i)) for i in range(n)]


def joining(engine: Engine, todo: list[tuple[list[int], SamplingParams]]) -> list:
    """Submit three requests, then two more after every step while any are left (joining rows that are decoding,
    and waiting once the slots are full); step until all are done."""
    requests = [engine.submit(*t) for t in todo[:3]]
    while engine.has_work():
        engine.step()
        requests += [engine.submit(*t) for t in todo[len(requests) : len(requests) + 2]]
        assert len(engine.running) <= engine.max_batch
    return requests


@pytest.fixture(scope="module")
def mixed(model) -> tuple[list, list[list[int]]]:
    """24 requests of mixed sampling and the tokens each gives decoded alone (eager, dynamic cache)."""
    todo = mixed_requests(24)
    expected = [alone(model, *t) for t in todo]
    assert len({tuple(tokens) for tokens in expected}) == len(expected)  # every seed and prompt draws its own
    return todo, expected


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("max_batch", [1, 16])
def test_rows_of_mixed_sampling_joining_and_leaving_decode_as_alone(model, mixed, static, max_batch):
    todo, expected = mixed
    requests = joining(Engine(model, max_batch=max_batch, static=static), todo)
    assert [r.tokens for r in requests] == expected


@pytest.mark.slow
@pytest.mark.parametrize("max_batch", [1, 16])
def test_compiled_step_with_mixed_sampling_decodes_as_eager(model, mixed, max_batch, fresh_compiler):
    """Decoding and each row's pick in one compiled step (CUDA graphs on a GPU) give the eager path's tokens at batch
    1 and 16, greedy and sampled rows together, requests joining and leaving."""
    pytest.importorskip("torch._inductor")
    todo, expected = mixed
    engine = Engine(model, max_batch=max_batch, compile=True)
    assert [r.tokens for r in joining(engine, todo)] == expected


def test_stop_ids_budget_and_cancel_free_slots(model):
    free_run = alone(model, PROMPTS[0])
    stop = next(t for i, t in enumerate(free_run) if i >= 3 and free_run.index(t) == i)  # first seen late
    engine = Engine(model, max_batch=2)
    stopped = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0.0, stop_ids=(stop,)))
    cancelled = engine.submit(PROMPTS[1], GREEDY)
    waiting = engine.submit(PROMPTS[2], GREEDY)
    engine.step()
    assert set(engine.running) == {stopped, cancelled} and list(engine.waiting) == [waiting]
    engine.cancel(cancelled)
    assert cancelled.finish_reason == "cancelled" and engine.running == [stopped]
    while engine.has_work():
        engine.step()
    assert stopped.tokens == free_run[: free_run.index(stop) + 1] and stopped.finish_reason == "stop"
    assert waiting.tokens == alone(model, PROMPTS[2]) and waiting.finish_reason == "length"
    # The budget is capped by the cache: prompt and new tokens fit max_len.
    short = Engine(model, max_batch=1, max_len=10)
    capped = short.submit(PROMPTS[0], GREEDY)
    while short.has_work():
        short.step()
    assert capped.tokens == free_run[:3] and capped.finish_reason == "length"


def test_bad_requests_are_refused(model):
    engine = Engine(model, max_batch=1)
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit([], GREEDY)
    with pytest.raises(ValueError, match="prompt of 48 tokens leaves no room under max_len=48"):
        engine.submit([1] * 48, GREEDY)
    for bad, match in [
        (SamplingParams(max_new_tokens=0), "max_new_tokens 0: must be at least 1"),
        (SamplingParams(temperature=float("nan")), "temperature nan"),
        (SamplingParams(temperature=-1.0), "temperature -1.0"),
        (SamplingParams(top_k=-2), r"top_k -2: must be at least 1, or 0 or -1 for none"),
        (SamplingParams(top_p=0.0), r"top_p 0.0: must lie in \(0, 1\]"),
        (SamplingParams(top_p=1.5), "top_p 1.5"),
    ]:
        with pytest.raises(ValueError, match=match):
            engine.submit([1], bad)
    assert not engine.has_work()


def test_stream_through_a_shared_engine_smaller_than_the_batch(model):
    engine = Engine(model, max_batch=2)
    expected = generate(model, PROMPTS, 8, temperature=0.0, eos_id=PROMPTS[0][0])
    assert generate(model, PROMPTS, 8, temperature=0.0, eos_id=PROMPTS[0][0], engine=engine) == expected
    steps = stream(model, PROMPTS, 8, temperature=0.0, engine=engine)
    next(steps)
    steps.close()  # a caller that stops early leaves nothing behind in the engine
    assert not engine.has_work()


@pytest.mark.parametrize("static", [False, True])
def test_a_batched_step_moves_logits_by_rounding_only(model, static):
    # Rows of different fill levels decoding together sum in other orders than one row alone: the logits may differ
    # in the last bits, never more (tests/test_serve.py relies on this bound for its greedy comparisons).
    def prefilled(prompts):
        device = model.embed.weight.device
        cache = KVCache.empty(SMALL, len(prompts), SMALL.max_seq_len, device, torch.float32, static=static)
        for i, p in enumerate(prompts):
            row = cache.rows(i, 1)
            model(torch.tensor([p], device=device), cache=row)
            cache.lengths[i] = len(p)
        return cache

    ids = torch.tensor([p[0] for p in PROMPTS], device=model.embed.weight.device)
    with torch.no_grad():
        batched = decode_one(model, ids, prefilled(PROMPTS))
        for i, p in enumerate(PROMPTS):
            lone = decode_one(model, ids[i : i + 1], prefilled([p]))
            torch.testing.assert_close(batched[i : i + 1], lone, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_engine_reads_each_step_one_call_later(model, fresh_compiler):
    """The compiled step is launched before the step before it is read, so its tokens come with the next call. A
    request that stops on a stop id drops the token decoded in flight, one cancelled in flight gets nothing more, and
    one whose budget fills the cache is not launched past its last token."""
    pytest.importorskip("torch._inductor")
    free_run, other = alone(model, PROMPTS[0]), alone(model, PROMPTS[1])
    stop = next(t for i, t in enumerate(free_run) if i >= 3 and free_run.index(t) == i)  # first seen late
    engine = Engine(model, max_batch=2, compile=True)
    stopped = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=0.0, stop_ids=(stop,)))
    cancelled = engine.submit(PROMPTS[1], GREEDY)
    assert dict(engine.step()) == {stopped: free_run[0], cancelled: other[0]}  # the prefill's first tokens
    assert engine.step() == []  # the first decoding step launched, nothing read yet
    assert dict(engine.step()) == {stopped: free_run[1], cancelled: other[1]}  # the second launched, the first read
    engine.cancel(cancelled)  # while its third token is in flight
    while engine.has_work():
        engine.step()
    assert stopped.tokens == free_run[: free_run.index(stop) + 1] and stopped.finish_reason == "stop"
    assert cancelled.tokens == other[:2]
    short = Engine(model, max_batch=1, max_len=10, compile=True)
    capped = short.submit(PROMPTS[0], GREEDY)  # 7 tokens: room for 3 new ones, the last never written
    while short.has_work():
        short.step()
    assert capped.tokens == free_run[:3] and short.cache.positions.tolist() == [9]


class RecordedEvent:
    """Stands for a torch.cuda.Event: what was asked of it."""

    def __init__(self):
        self.calls = []

    def record(self, stream):
        self.calls.append(("record", stream))

    def synchronize(self):
        self.calls.append(("synchronize",))


@pytest.mark.slow
def test_a_launched_step_lands_behind_an_event_on_its_own_devices_stream(model, monkeypatch, fresh_compiler):
    """On a GPU a step's ids land in host memory behind an event recorded on the stream of the engine's device (not
    the current GPU's: `--device cuda:1`), and reading them waits for it; steps land in two buffers in turn."""
    pytest.importorskip("torch._inductor")
    if next(model.parameters()).device.type != "cpu":
        pytest.skip("the events are simulated on the CPU; on CUDA the other compiled tests run the real ones")
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"the stream of {device}")
    engine = Engine(model, max_batch=1, compile=True)
    landings = [Landing(torch.zeros(1, dtype=torch.long), RecordedEvent()) for _ in range(2)]
    engine._graph._landings = list(landings)
    request = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=4, temperature=0.0))
    for _ in range(3):  # the prefill, then the first step launched, then the second launched and the first read
        engine.step()
    assert landings[0].ready.calls == [("record", "the stream of cpu"), ("synchronize",)]
    assert landings[1].ready.calls == [("record", "the stream of cpu")]
    while engine.has_work():
        engine.step()
    assert request.tokens == alone(model, PROMPTS[0])[:4]


@pytest.mark.slow
def test_compiled_engine_with_requests_joining_and_leaving(model, fresh_compiler):
    pytest.importorskip("torch._inductor")
    expected = [alone(model, p) for p in PROMPTS]
    engine = Engine(model, max_batch=3, compile=True)
    try:
        requests = [engine.submit(p, GREEDY) for p in PROMPTS[:2]]
        engine.step()
    except Exception as e:  # no C++ toolchain for inductor's CPU kernels on this machine
        if "compil" in str(e).lower() and "C++" in str(e):
            pytest.skip(f"torch.compile cannot build CPU kernels here: {str(e).splitlines()[0][:100]}")
        raise
    requests += [engine.submit(p, GREEDY) for p in PROMPTS[2:]]  # two of them wait for a free slot
    while engine.has_work():
        engine.step()
    assert [r.tokens for r in requests] == expected


def test_a_flex_step_that_does_not_compile_decodes_through_sdpa(model, monkeypatch, caplog, fresh_compiler):
    """Where the step that attends through flex_attention fails to compile (its Triton kernel not yet built on that
    GPU and torch), the engine warns once and compiles the step through SDPA: the same tokens, and later engines do
    not try flex again. A compile failure in another part of the step is raised as it is."""
    pytest.importorskip("torch._inductor")
    from axiom.infer import compiled
    from axiom.model import transformer

    def uncompilable(*args, **kwargs):
        torch._dynamo.graph_break()  # the step is compiled whole (fullgraph): its compile fails here

    device = next(model.parameters()).device
    monkeypatch.setattr(transformer, "FLEX_DEVICES", frozenset({device.type}))  # the GPU's path, on a CPU too
    monkeypatch.setattr(transformer, "flex_attention", uncompilable)
    expected = [generate(model, prompts, 6, temperature=0.0) for prompts in (PROMPTS[:3], PROMPTS[3:])]
    with caplog.at_level(logging.WARNING, logger="axiom.model.transformer"):
        assert generate(model, PROMPTS[:3], 6, temperature=0.0, compile=True) == expected[0]
        assert generate(model, PROMPTS[3:], 6, temperature=0.0, compile=True) == expected[1]  # another shape
        monkeypatch.setattr(compiled, "greedy", uncompilable)
        with pytest.raises(torch._dynamo.exc.TorchDynamoException):
            generate(model, PROMPTS[:3], 6, temperature=0.0, compile=True)
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"flex_attention's decoding step did not compile on {device.type} ("
    )
    assert warnings[0].endswith("); decoding attends through SDPA") and not transformer.FLEX_DEVICES


@pytest.mark.slow
def test_compiled_engines_of_several_models_and_shapes_pass_dynamos_recompile_limit(device, fresh_compiler):
    """Every engine's step is one code object to dynamo, whose recompile limit (8) counts the compiled variants of
    all engines in the process: each model, dtype and batch shape adds some. Lowered here to 2 so that three
    variants (two batch sizes, then another model) show it quickly: building a compiling engine raises it (once, not
    around every step), and keeps a higher limit as it is."""
    pytest.importorskip("torch._inductor")
    models = [Axiom(replace(SMALL, n_layers=n)).to(device).eval() for n in (1, 2)]
    with torch._dynamo.config.patch(recompile_limit=2):
        for model, batch in [(models[0], 1), (models[0], 2), (models[1], 1), (models[1], 3)]:
            expected = generate(model, PROMPTS[:batch], 4, temperature=0.0)
            assert generate(model, PROMPTS[:batch], 4, temperature=0.0, compile=True) == expected
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT + 1):
        Engine(models[0], compile=True)
        assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT + 1


def test_temperatures_the_maths_cannot_take_are_greedy_or_refused(model):
    # Dividing float32 logits by 1e-45 (a denormal) gave inf, then NaN probabilities, and the step raised.
    for tiny in (1e-45, 1e-50, 1e-5):
        assert alone(model, PROMPTS[0], SamplingParams(max_new_tokens=12, temperature=tiny, seed=1)) == alone(
            model, PROMPTS[0]
        )
    assert SamplingParams(temperature=1e-4).greedy is False and SamplingParams(temperature=0).greedy is True
    for bad, name in [
        (SamplingParams(temperature=float("inf")), "temperature"),
        (SamplingParams(seed=2**64), "seed"),
        (SamplingParams(seed=-(2**63) - 1), "seed"),
    ]:
        assert bad.problem()[0] == name
    assert SamplingParams(seed=2**64 - 1).problem() is None and SamplingParams(seed=-(2**63)).problem() is None


def poisoned(model, token: int):
    """A copy of `model` whose embedding of `token` is NaN: a request that reads it gets NaN logits in its own row
    (as a model that overflows on some input does), and no other row can."""
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.embed.weight[token] = float("nan")
    return bad


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_row_failing_in_a_step_another_leaves_leaves_no_nan_behind(model, static):
    """A dynamic engine moves its last row into a freed one: when that last row is one failing in the same step
    (its prefill not finite), its NaN keys stayed in the row it left, and a clean request taking it later failed."""
    poison = 99
    bad = poisoned(model, poison)
    engine = Engine(bad, max_batch=2, static=static)
    short = engine.submit([5], replace(GREEDY, max_new_tokens=1))  # row 0: ends at its first token
    failing = engine.submit([1, 2, 3, poison, 4, 5, 6, 7], GREEDY)  # row 1: its prefill is not finite
    engine.step()
    later = [engine.submit([10, 11, 12, 13, 14, 15], GREEDY)]  # takes row 0
    engine.step()
    later.append(engine.submit([20], GREEDY))  # takes row 1, the failing request's until the step before
    while engine.has_work():
        engine.step()
    assert short.finish_reason == "length" and failing.finish_reason == "error"
    assert [r.tokens for r in later] == [alone(bad, [10, 11, 12, 13, 14, 15]), alone(bad, [20])]
    assert all(r.error is None for r in later)


@pytest.mark.parametrize("kind", ["dynamic", "static", "compiled"])
def test_a_failing_row_leaves_alone_and_the_others_decode_as_alone(model, kind, fresh_compiler):
    clean = [alone(model, p) for p in PROMPTS]
    # a token the first prompt generates at its third step and no other prompt reads or generates
    others = {t for p, c in zip(PROMPTS[1:], clean[1:], strict=True) for t in p + c}
    poison = next(t for t in clean[0][2:] if t not in others and t not in PROMPTS[0])
    engine = Engine(poisoned(model, poison), max_batch=3, static=kind == "static", compile=kind == "compiled")
    victim = engine.submit(PROMPTS[0], GREEDY)  # fails mid-batch, when its step reads the poison
    sampled = engine.submit([poison, *PROMPTS[1]], SamplingParams(max_new_tokens=12, temperature=0.9, seed=1))
    requests = [engine.submit(p, GREEDY) for p in PROMPTS[1:]]  # those beyond 3 wait, then take freed rows
    failed = []
    while engine.has_work():
        failed += [request for request, token in engine.step() if token is None]
    assert failed == [sampled, victim]  # the sampled one at its prefill, the greedy one when its step reads it
    assert victim.tokens == clean[0][: clean[0].index(poison) + 1] and sampled.tokens == []
    assert all(r.finish_reason == "error" and "not finite" in r.error for r in failed)
    # the others, including those that took the failed rows (zeroed: no NaN left in a masked slot), as alone
    assert [r.tokens for r in requests] == clean[1:]
    assert all(r.finish_reason == "length" and r.error is None for r in requests)


def test_a_failing_row_is_one_line_in_generate_and_chat(model):
    """`axiom generate` and `chat` end a row that fails with the line `axiom serve` answers its client with."""
    from axiom.infer.chat import Chat
    from axiom.text.chatml import IM_START

    line = "decoding failed: the model's logits are not finite (NaN or inf) for this prompt"
    with pytest.raises(AxiomError) as e:
        generate(poisoned(model, 99), [[5, 99, 6]], 4)
    assert str(e.value) == line
    chat_model = Axiom(replace(SMALL, vocab_size=IM_START + 16)).to(next(model.parameters()).device).eval()
    with pytest.raises(AxiomError) as e:
        list(Chat(poisoned(chat_model, IM_START), None, 4).reply("hi"))  # every chat prompt reads <|im_start|>
    assert str(e.value) == line


def sharp_model(vocab: int, context: int, poison: int) -> Axiom:
    """A micro model with peaked, context-dependent outputs (few near-ties, so every pick is clear) whose embedding
    of `poison` is NaN: a request that reads it fails in its own row."""
    cfg = get_config("tiny", [f"vocab_size={vocab}", "d_model=32", "n_layers=2", "n_heads=4", "n_kv_heads=2"])
    model = Axiom(replace(cfg.model, max_seq_len=context, tie_embeddings=False)).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = 1.0 if name == "embed.weight" else (4.0 if name == "lm_head.weight" else 1.0) / p.shape[1] ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std * (3.0 if "qkv" in name else 1.0))
        model.embed.weight[poison] = float("nan")
    return model


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_random_arrivals_cancels_and_failures_decode_as_alone(static):
    """A seeded differential fuzz, bounded: requests of random prompts (up to the whole context), budgets (past the
    room left) and sampling arrive at random steps, some are cancelled before or after admission, some read a
    poisoned token. Each finished request gives what it gives alone, a cancelled one a prefix of that, a poisoned one
    fails alone. (A longer run of the same kind found the NaN left behind by a row failing in a step another left.)"""
    context, poison = 40, 7
    model = sharp_model(300, context, poison)
    rng = random.Random(1234)
    reasons = collections.Counter()
    for _ in range(40):
        engine = Engine(model, max_batch=rng.choice([2, 3, 5]), static=static)
        plan = []  # (step submitted, prompt, params, step cancelled or None)
        for _ in range(rng.randint(3, 9)):
            prompt = [rng.randrange(8, 300) for _ in range(rng.choice([1, 2, 5, 17, context - 2, context - 1]))]
            if rng.random() < 0.15:
                prompt[rng.randrange(len(prompt))] = poison
            greedy = rng.random() < 0.5
            params = SamplingParams(
                max_new_tokens=rng.choice([1, 2, 6, 100]),
                temperature=0.0 if greedy else rng.choice([0.5, 1.0, 1.5]),
                top_k=rng.choice([None, 1, 5, 40]),
                top_p=rng.choice([None, 0.5, 0.95]),
                seed=rng.randrange(2**32),
                stop_ids=tuple(rng.sample(range(8, 300), 3)) if rng.random() < 0.3 else (),
            )
            plan.append((rng.randrange(6), prompt, params, rng.choice([None, None, rng.randrange(8)])))
        requests, step = [], 0
        while step < 8 or engine.has_work():
            requests += [(engine.submit(p, params), p, when) for at, p, params, when in plan if at == step]
            for request, _, when in requests:
                if when == step:
                    engine.cancel(request)
            engine.step()
            step += 1
        for request, prompt, cancelled_at in requests:
            expected = alone(model, prompt, request.params)
            if poison in prompt or request.finish_reason == "error":
                assert poison in prompt and request.finish_reason in ("error", "cancelled"), request
            elif request.finish_reason == "cancelled":
                assert cancelled_at is not None and expected[: len(request.tokens)] == request.tokens
            else:
                assert request.tokens == expected, (static, prompt, request.params)
            reasons[request.finish_reason] += 1
    assert min(reasons[r] for r in ("length", "stop", "cancelled", "error")) > 0, reasons  # every path was taken
