"""Training: schedule, accumulation, optimizer choice, the loop's eval.csv, checkpoints, exact resume (in process
and after kill -9), a crash while writing a checkpoint, non-finite steps, and 2 gloo processes vs 1."""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    MICRO,
    MICRO_VOCAB,
    count_params,
    micro_args,
    micro_config,
    read_rows,
    signalled_train_step,
)
from reliability_helpers import hashes
from safetensors.torch import load_file

import axiom.train.checkpointer as checkpointer_mod
import axiom.train.trainer as trainer_mod
from axiom.config import ModelConfig, TrainConfig
from axiom.data.loader import read_manifest
from axiom.errors import AxiomError
from axiom.model.checkpoint import (
    list_checkpoints,
    load_model,
    load_training_state,
    save_training_state,
    verify_checkpoint,
    write_checksums,
)
from axiom.model.transformer import Axiom, Block
from axiom.train.evaluator import EVAL_COLUMNS, Evaluator
from axiom.train.launch import train, uneven_split
from axiom.train.optim import _adamw8bit_step_fails, build_optimizer, check_optimizer_state_loads, lr_at
from axiom.train.progress import periodic, periodic_after
from axiom.train.step import train_step


def final_weights(run):
    last = list_checkpoints(run / "checkpoints")[-1][1]
    return load_file(last / "model.safetensors")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- the schedule, the optimizer and one step


def test_lr_schedule_boundaries():
    cfg = TrainConfig(
        target_tokens=200, micro_batch_size=1, seq_len=2, grad_accum_steps=1, warmup_steps=10, lr_max=1e-3, lr_min=1e-4
    )
    assert cfg.steps == 100 and cfg.decay_fraction == 0.2
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # warmup: (step + 1) / warmup_steps of lr_max
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == lr_at(50, cfg) == lr_at(79, cfg) == 1e-3  # constant
    assert lr_at(80, cfg) == pytest.approx(1e-3)  # the cosine starts at lr_max over the last 20 steps ...
    assert lr_at(99, cfg) == pytest.approx(1e-4)  # ... and ends at lr_min on the last step
    mid = 1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 10 / 19))
    assert lr_at(90, cfg) == pytest.approx(mid)
    decay = [lr_at(s, cfg) for s in range(80, 100)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    flat = TrainConfig(
        target_tokens=200, micro_batch_size=1, seq_len=2, grad_accum_steps=1, decay_fraction=0.0, warmup_steps=0
    )
    assert lr_at(99, flat) == flat.lr_max
    # a decay of one step (6 steps x 0.2) is that step at lr_min (it stayed at lr_max)
    short = dataclasses.replace(cfg, target_tokens=12, warmup_steps=0)
    assert short.steps == 6 and [lr_at(s, short) for s in (4, 5)] == [1e-3, 1e-4]


def _model_and_opt(cfg, seed=0, device="cpu"):
    torch.manual_seed(seed)
    model = Axiom(cfg.model).to(device)
    return model, build_optimizer(model, cfg.train, device)[0]


def test_gradient_accumulation_equals_one_large_batch(device):
    cfg = micro_config()
    x = torch.randint(0, MICRO_VOCAB, (4, 32))
    y = torch.randint(0, MICRO_VOCAB, (4, 32))
    m1, _ = _model_and_opt(cfg, device=device)
    m2, _ = _model_and_opt(cfg, device=device)
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    # plain SGD with lr 1: the weight change is the (clipped) gradient itself, which Adam would blur
    r1 = train_step(m1, torch.optim.SGD(m1.parameters()), [(x[:2], y[:2]), (x[2:], y[2:])], 1.0, cfg.train)
    r2 = train_step(m2, torch.optim.SGD(m2.parameters()), [(x, y)], 1.0, cfg.train)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-6)
    assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-5)
    for name, p1 in m1.state_dict().items():
        p2 = m2.state_dict()[name]
        torch.testing.assert_close(p1 - before[name], p2 - before[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(m1.embed.weight, before["embed.weight"])


def test_compile_goes_by_region_one_graph_for_all_blocks_and_equals_eager(device, fresh_compiler):
    """`compile=true` compiles each block, the final norm and the loss's chunk: three graphs whatever the depth (a
    graph per block would be five here), and the step's loss and gradients are those of the eager model."""
    from torch._dynamo.utils import counters

    from axiom.train.parallel import Dist, parallelize

    cfg = micro_config("n_layers=3", "compile=true")
    x = torch.randint(0, MICRO_VOCAB, (2, 32), device=device)
    y = torch.randint(0, MICRO_VOCAB, (2, 32), device=device)
    eager, _ = _model_and_opt(cfg, device=device)
    compiled, _ = _model_and_opt(cfg, device=device)
    compiled.load_state_dict(eager.state_dict())
    counters.clear()
    parallelize(compiled, cfg.train, device, Dist())
    losses = [model(x, y) for model in (eager, compiled)]
    for loss in losses:
        loss.backward()
    assert counters["stats"]["unique_graphs"] == 3
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints look the same


def test_optimizer_is_adamw8bit_else_torch_adamw_with_notice(monkeypatch, caplog, device):
    cfg = micro_config("optimizer=adamw8bit")
    model = Axiom(cfg.model).to(device)
    opt, name = build_optimizer(model, cfg.train, device)
    assert name == "AdamW8bit (bitsandbytes)" and type(opt).__name__ == "AdamW8bit"
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert {p.dim() for p in decayed["params"]} == {2} and {p.dim() for p in plain["params"]} == {1}
    assert any(p is model.embed.weight for p in decayed["params"])  # the tied table, once
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == count_params(model)
    assert opt.param_groups[0]["betas"] == (0.9, 0.95)

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    opt, name = build_optimizer(model, cfg.train, device)
    assert isinstance(opt, torch.optim.AdamW) and name == "AdamW (torch, fused)"
    err = caplog.text
    assert "notice: bitsandbytes is not usable (ModuleNotFoundError" in err and "using torch AdamW" in err


def test_a_run_without_bitsandbytes_plans_and_logs_torch_adamw(tiny_data, tmp_path, monkeypatch):
    """The plan counted 8-bit optimizer state (2 bytes a parameter, not 8) for a run that would train with torch
    AdamW, and the reason was on stderr only."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    run = tmp_path / "run"
    train(micro_config("optimizer=adamw8bit", "max_steps=2", "eval_interval=2"), tiny_data, run)
    log = (run / "train.log").read_text()
    assert "notice: bitsandbytes is not usable (ModuleNotFoundError" in log and "optimizer    AdamW (torch" in log
    assert json.loads((run / "config.json").read_text())["train"]["optimizer"] == "adamw"  # what trained


def test_adamw8bit_is_probed_once_a_process(tiny_data, tmp_path, monkeypatch):
    """Planning the run and building its optimizer both ask whether AdamW8bit runs here: one probe step."""
    bnb = pytest.importorskip("bitsandbytes")
    made, real = [], bnb.optim.AdamW8bit
    monkeypatch.setattr(bnb.optim, "AdamW8bit", lambda *a, **k: made.append(1) or real(*a, **k))
    _adamw8bit_step_fails.cache_clear()
    train(micro_config("optimizer=adamw8bit", "max_steps=1", "eval_interval=1"), tiny_data, tmp_path / "run")
    assert len(made) == 2  # the probe's and the run's
    assert "AdamW8bit (bitsandbytes)" in (tmp_path / "run" / "train.log").read_text()


def test_an_adamw8bit_checkpoint_under_fsdp_names_fsdp_as_the_reason():
    """FSDP builds torch AdamW whether or not bitsandbytes works: the message blamed bitsandbytes and advised
    installing it."""
    fsdp = r"run: .*and FSDP shards need torch AdamW: leave FSDP out \(--set fsdp=false: DDP or one process\) to resume"
    with pytest.raises(AxiomError, match=fsdp):
        check_optimizer_state_loads("AdamW8bit (bitsandbytes)", "AdamW (torch, fused)", "run", fsdp=True)
    with pytest.raises(AxiomError, match="bitsandbytes is not usable here"):
        check_optimizer_state_loads("AdamW8bit (bitsandbytes)", "AdamW (torch, fused)", "run")
    check_optimizer_state_loads("AdamW (torch, fused)", "AdamW (torch, fused)", "run", fsdp=True)  # nothing to say


def test_non_finite_step_is_skipped_and_leaves_weights():
    cfg = micro_config()
    model, opt = _model_and_opt(cfg)
    with torch.no_grad():
        model.layers[0].attn_norm.weight[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, MICRO_VOCAB, (2, 32))
    result = train_step(model, opt, [(x, x)], 1e-3, cfg.train)
    assert result.skipped and math.isnan(result.loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) or (v.isnan() == before[k].isnan()).all(), k
    assert all(p.grad is None for p in model.parameters())


# ---- the loop


def test_short_run_learns_and_writes_eval_csv(tiny_data, tmp_path):
    cfg = micro_config("max_steps=24", "eval_interval=8", "checkpoint_interval=8", "keep_checkpoints=2")
    run = tmp_path / "run"
    result = train(cfg, tiny_data, run)
    assert result.step == 24 and result.tokens == 24 * 128 and result.stopped is None
    rows = read_rows(run / "eval.csv")
    assert tuple(rows[0]) == EVAL_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 8, 16, 24]
    assert [int(r["tokens"]) for r in rows] == [0, 1024, 2048, 3072]
    first, last = float(rows[0]["val_loss"]), float(rows[-1]["val_loss"])
    assert first == pytest.approx(math.log(MICRO_VOCAB), abs=0.2)  # untrained: about uniform over the vocabulary
    assert last < first - 2.5, (first, last)
    for r in rows:
        loss = float(r["val_loss"])
        assert float(r["val_ppl"]) == pytest.approx(math.exp(loss), rel=1e-9)
        assert 0 < float(r["val_bpb"]) < loss / math.log(2)  # every token here is more than one byte
    steps = [float(r["loss"]) for r in read_rows(run / "train.csv")]
    assert len(steps) == 24 and steps == [s.loss for s in result.history]
    train_losses = [float(r["train_loss"]) for r in rows[1:]]
    assert train_losses[0] == pytest.approx(sum(steps[:8]) / 8)
    assert [float(r["lr"]) for r in rows[1:]] == [lr_at(s - 1, cfg.train) for s in (8, 16, 24)]
    # the newest keep_checkpoints plus best; best holds the lowest val loss and loads for generate/export
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [16, 24]
    model, _, meta = load_model(run / "checkpoints" / "best")
    assert meta["step"] == 24 and meta["val_loss"] == pytest.approx(last)
    assert (
        meta["data"]["dir"] == str(tiny_data)
        and meta["data"]["train_tokens"] == read_manifest(tiny_data)["train_tokens"]
    )
    log = (run / "train.log").read_text()
    assert "optimizer    AdamW (torch, fused)" in log and "step 24/24 | loss" in log and "tok/s" in log


def test_periodic_after_counts_the_evaluations_and_checkpoints_still_due():
    for steps, interval in ((24, 8), (25, 8), (7, 10), (1, 1)):
        for step in range(steps + 1):
            due = sum(periodic(s, steps, interval) for s in range(step + 1, steps + 1))
            assert periodic_after(step, steps, interval) == due, (steps, interval, step)


def slow_evaluations_and_checkpoints(monkeypatch) -> None:
    """Each evaluation takes 30 s and each checkpoint 12 s on the fake clock of the runs' progress lines; the steps
    themselves are milliseconds."""
    now = [0.0]

    def taking(seconds, original):
        def call(*args):
            now[0] += seconds
            return original(*args)

        return call

    monkeypatch.setattr(Evaluator, "evaluate", taking(30.0, Evaluator.evaluate))
    saving = checkpointer_mod.Checkpointer.save_if_healthy
    monkeypatch.setattr(checkpointer_mod.Checkpointer, "save_if_healthy", taking(12.0, saving))
    monkeypatch.setattr(trainer_mod, "Progress", functools.partial(trainer_mod.Progress, clock=lambda: now[0]))


def etas_of(log: str) -> list[int]:
    """The seconds of each progress line's ETA in train.log's text `log`."""
    return [int(m) * 60 + int(s) for m, s in re.findall(r"^step \d/\d .* \| eta (\d+)m(\d\d)s$", log, re.M)]


def test_the_eta_counts_the_evaluations_and_checkpoints_still_to_come(tiny_data, tmp_path, monkeypatch):
    """The ETA counted the steps left at their speed and no evaluation or checkpoint, and "done" their time as all:
    with evaluations every N steps that can be most of a run."""
    slow_evaluations_and_checkpoints(monkeypatch)
    cfg = micro_config("max_steps=8", "eval_interval=4", "checkpoint_interval=4", "log_interval=2")
    train(cfg, tiny_data, tmp_path / "run")
    log = (tmp_path / "run" / "train.log").read_text()
    etas = etas_of(log)
    # at steps 2 and 4: the evaluations of steps 4 and 8 (no checkpoint timed yet); at 6 and 8: step 8's of each
    expected = [60, 60, 42, 42]
    assert len(etas) == 4 and all(e <= eta <= e + 1 for eta, e in zip(etas, expected, strict=True)), etas
    # 3 evaluations (steps 0, 4 and 8) and 2 checkpoints: 1m54s
    assert re.search(
        r"tokens in 0m0\ds of training steps \(all sessions\) and 1m54s of evaluations and checkpoints", log
    )


@pytest.mark.parametrize("saved", [True, False], ids=["checkpoint-with-times", "older-checkpoint"])
def test_a_resumed_runs_first_eta_counts_the_evaluations_and_checkpoints_its_checkpoint_timed(
    saved, tiny_data, tmp_path, monkeypatch
):
    """A resumed run counted no evaluation or checkpoint in its ETA until it had timed one of each again: the
    checkpoint did not keep what they took. Now its state holds their mean seconds (30 s and 12 s on a fake clock
    here), which the resumed run's first line counts; a checkpoint written before that resumes as it did."""
    slow_evaluations_and_checkpoints(monkeypatch)
    run = tmp_path / "run"
    settings = ("eval_interval=4", "checkpoint_interval=2", "log_interval=2")
    train(micro_config("max_steps=4", *settings), tiny_data, run)
    ckpt = run / "checkpoints" / "step_000004"
    state = load_training_state(ckpt)
    # the evaluations of steps 0 and 4, and the checkpoint of step 2: step 4's own was being written
    assert state["seconds_per"] == {"evaluation": 30.0, "checkpoint": 12.0}
    if not saved:
        del state["seconds_per"]
        save_training_state(state, ckpt)
        write_checksums(ckpt)
    train(micro_config("max_steps=8", *settings), tiny_data, run, resume=True)
    etas = etas_of((run / "train.log").read_text().partition(f"resumed from {ckpt}")[2])
    # at step 6: the evaluation of step 8 and the checkpoints of steps 6 and 8; at 8: step 8's, of which only a
    # checkpoint (step 6's) was timed by this run
    expected = [30 + 2 * 12, 30 + 12] if saved else [0, 12]
    assert len(etas) == 2 and all(e <= eta <= e + 1 for eta, e in zip(etas, expected, strict=True)), etas


def test_progress_lines_give_the_figures_train_csv_holds(tiny_data, tmp_path):
    """A progress line's "loss" was the mean of the steps since the last line, train.csv's the step's: two figures
    named alike for one step. Now the line gives the step's, as the csv and the bar do, and names its mean."""
    run = tmp_path / "run"
    result = train(micro_config("max_steps=9", "log_interval=3"), tiny_data, run)
    line = re.compile(
        r"step (\d+)/9 \| loss ([\d.]+) \(mean ([\d.]+) over 3 steps\) \| lr ([\d.e+-]+) \| grad norm ([\d.]+) "
        r"\| ([\d,]+) tok/s \| eta "
    )
    shown = [m.groups() for m in map(line.match, (run / "train.log").read_text().splitlines()) if m]
    rows = read_rows(run / "train.csv")
    assert [int(step) for step, *_ in shown] == [int(r["step"]) for r in rows] == [3, 6, 9]
    for (step, loss, mean, lr, grad_norm, rate), row in zip(shown, rows, strict=True):
        assert float(loss) == round(float(row["loss"]), 4) and float(lr) == float(f"{float(row['lr']):.3e}")
        assert float(grad_norm) == round(float(row["grad_norm"]), 3)
        # the csv keeps the rate to 0.1, the line to 1: both from one figure (24,549 beside 24549.5 is that)
        assert abs(int(rate.replace(",", "")) - float(row["tokens_per_s"])) <= 0.55
        losses = [s.loss for s in result.history[int(step) - 3 : int(step)]]
        assert float(mean) == round(sum(losses) / 3, 4)


def test_the_plan_says_how_many_val_tokens_an_evaluation_covers(tiny_data, tmp_path):
    """It said eval_tokens where the val split holds fewer (8,192 planned, 1,920 evaluated)."""
    val = read_manifest(tiny_data)["val_tokens"]
    covered = (val - 1) // 32 * 32
    train(micro_config("max_steps=1", "eval_tokens=100000"), tiny_data, tmp_path / "short")
    log = (tmp_path / "short" / "train.log").read_text()
    assert f"eval every 40 steps on {covered:,} tokens (all the val split holds of eval_tokens=100,000)," in log
    assert f"val loss {float(read_rows(tmp_path / 'short' / 'eval.csv')[-1]['val_loss']):.4f}" in log
    train(micro_config("max_steps=1"), tiny_data, tmp_path / "enough")
    assert "eval every 40 steps on 256 tokens, checkpoint" in (tmp_path / "enough" / "train.log").read_text()


def test_interrupt_and_resume_equals_uninterrupted(tiny_data, tmp_path, monkeypatch):
    cfg = micro_config("max_steps=10", "eval_interval=4", "checkpoint_interval=3", "optimizer=adamw8bit")
    full = train(cfg, tiny_data, tmp_path / "full")

    real_step = trainer_mod.train_step
    # SIGTERM arrives during step 5: a checkpoint at its end, then exit
    monkeypatch.setattr(trainer_mod, "train_step", signalled_train_step(5, signal.SIGTERM))
    part = tmp_path / "part"
    first = train(cfg, tiny_data, part)
    assert first.stopped == "SIGTERM" and first.step == 5
    saved = part / "checkpoints" / "step_000005"
    assert f"stopped by SIGTERM at step 5: saved {saved}; continue with --resume" in (part / "train.log").read_text()
    monkeypatch.setattr(trainer_mod, "train_step", real_step)
    with pytest.raises(AxiomError, match="already holds a run; pass --resume"):
        train(cfg, tiny_data, part)
    second = train(cfg, tiny_data, part, resume=True)
    assert second.step == 10
    losses = [s.loss for s in first.history + second.history]
    assert losses == [s.loss for s in full.history]
    assert_same_weights(final_weights(part), final_weights(tmp_path / "full"))
    state_full = load_training_state(list_checkpoints(tmp_path / "full" / "checkpoints")[-1][1])
    state_part = load_training_state(list_checkpoints(part / "checkpoints")[-1][1])
    assert state_full["loader"] == state_part["loader"]
    assert read_rows(part / "eval.csv")[-1]["val_loss"] == read_rows(tmp_path / "full" / "eval.csv")[-1]["val_loss"]


def test_a_run_that_fell_back_to_torch_adamw_resumes_with_it_and_an_8bit_one_needs_bitsandbytes(
    tiny_data, tmp_path, monkeypatch, caplog
):
    """Started where bitsandbytes was unusable (torch AdamW), resumed where it works: the run goes on with torch
    AdamW, loss for loss as if never stopped (it used to fail with KeyError 'state1'). The other way round, a
    checkpoint of AdamW8bit's state without bitsandbytes is a one-line error naming the way out."""
    cfg = micro_config("max_steps=6", "checkpoint_interval=3", "optimizer=adamw8bit")
    real_step = trainer_mod.train_step
    with monkeypatch.context() as without_bnb:
        without_bnb.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
        full = train(cfg, tiny_data, tmp_path / "full")
        # SIGTERM during step 3: a checkpoint at its end, then exit
        without_bnb.setattr(trainer_mod, "train_step", signalled_train_step(3, signal.SIGTERM))
        first = train(cfg, tiny_data, tmp_path / "part")
    assert first.step == 3
    second = train(cfg, tiny_data, tmp_path / "part", resume=True)
    assert "holds AdamW (torch, fused)'s state (the run fell back to it); continuing with it" in caplog.text
    assert [s.loss for s in first.history + second.history] == [s.loss for s in full.history]

    monkeypatch.setattr(trainer_mod, "train_step", signalled_train_step(3, signal.SIGTERM))
    train(cfg, tiny_data, tmp_path / "8bit")
    monkeypatch.setattr(trainer_mod, "train_step", real_step)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    log = tmp_path / "8bit" / "train.log"
    before, logged = hashes(tmp_path / "8bit"), log.read_text()
    with pytest.raises(AxiomError) as e:
        train(cfg, tiny_data, tmp_path / "8bit", resume=True)
    assert str(e.value) == (
        f"{tmp_path / '8bit'}: the run was trained with AdamW8bit (bitsandbytes), whose state torch AdamW cannot take, "
        "and bitsandbytes is not usable here (see the notice above); install it (pip install 'axiom-lm[bnb]') to "
        "resume, or start a new run from these weights with --init-from"
    )
    appended = log.read_text().removeprefix(logged)  # the notice the error points to, and nothing else
    assert appended.startswith("notice: bitsandbytes is not usable (") and appended.count("\n") == 1
    assert {k: v for k, v in hashes(tmp_path / "8bit").items() if k != str(log)} == {
        k: v for k, v in before.items() if k != str(log)
    }


class _OutOfMemoryInBackward(torch.autograd.Function):
    """Identity forward; backward fails as the CUDA allocator would, after the layers above have put gradients in."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")


def _fail_once_at(monkeypatch, micro_batch_size: int, nth: int = 1, at_failure=lambda: None) -> list[int]:
    """The `nth` training forward over `micro_batch_size` sequences (step `nth` where a step is one micro-batch)
    fails in its backward at the first block, the gradients of the layers above (and of the tied table) already in,
    after calling `at_failure()`; returns the failures."""
    failures, forwards, real = [], [], Block.forward

    def forward(self, x, cos, sin, cache=None, layer=0, mask=None):
        y = real(self, x, cos, sin, cache, layer, mask)
        if torch.is_grad_enabled() and x.shape[0] == micro_batch_size and layer == 0 and not failures:
            forwards.append(1)
            if len(forwards) == nth:
                at_failure()
                failures.append(micro_batch_size)
                return _OutOfMemoryInBackward.apply(y)
        return y

    monkeypatch.setattr(Block, "forward", forward)
    return failures


def _fail_in_the_update(monkeypatch, nth: int = 1, at_failure=lambda: None) -> None:
    """The optimizer's `nth` update fails, after calling `at_failure()`, with one parameter already updated: as
    AdamW8bit allocating its state parameter by parameter meets a full device."""
    real, steps = trainer_mod.build_optimizer, []

    def build_failing(*args, **kwargs):
        optimizer, name = real(*args, **kwargs)
        real_step, first = optimizer.step, optimizer.param_groups[0]["params"][0]

        def step(*a, **kw):
            steps.append(1)
            if len(steps) < nth:
                return real_step(*a, **kw)
            at_failure()
            with torch.no_grad():
                first.add_(1.0)  # one parameter updated, then the allocator fails
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB (simulated)\nstats")

        optimizer.step = step
        return optimizer, name

    monkeypatch.setattr(trainer_mod, "build_optimizer", build_failing)


def test_out_of_memory_halves_the_planned_micro_batch_and_redoes_the_step(tiny_data, tmp_path, monkeypatch):
    """micro_batch_size=auto: an out-of-memory in the first step (its backward half done) halves the micro-batch,
    doubles the accumulation and runs the step again from the same data: the run equals one started at the smaller
    micro-batch, step for step, with the same tokens per step and no step lost or counted twice."""
    settings = ("max_steps=4", "eval_interval=4", "checkpoint_interval=4")
    auto = micro_config("micro_batch_size=auto", "grad_accum_steps=4", *settings)  # 4 sequences a step
    failures = _fail_once_at(monkeypatch, 4)
    planned = train(auto, tiny_data, tmp_path / "auto")
    assert failures == [4]
    monkeypatch.undo()
    smaller = train(micro_config("micro_batch_size=2", "grad_accum_steps=2", *settings), tiny_data, tmp_path / "two")
    assert [s.loss for s in planned.history] == [s.loss for s in smaller.history]
    assert planned.step == smaller.step == 4 and planned.tokens == smaller.tokens == 4 * 128
    assert_same_weights(final_weights(tmp_path / "auto"), final_weights(tmp_path / "two"))
    log = (tmp_path / "auto" / "train.log").read_text()
    assert "plan         micro-batch 4 x 1 accumulation (auto)" in log
    assert "notice: out of memory at micro-batch 4 (step 1): micro-batch 2 x 2 accumulation from now on" in log
    for config in (tmp_path / "auto" / "config.json", list_checkpoints(tmp_path / "auto" / "checkpoints")[-1][1]):
        saved = json.loads((config if config.suffix else config / "config.json").read_text())["train"]
        assert (saved["micro_batch_size"], saved["grad_accum_steps"]) == (2, 2)


def test_out_of_memory_at_a_given_micro_batch_is_raised(tiny_data, tmp_path, monkeypatch):
    """A micro-batch set by hand is the user's choice: its out-of-memory is not hidden by a smaller one. It is one
    line with the ways on (it was torch's traceback and allocator statistics)."""
    failures = _fail_once_at(monkeypatch, 4)
    with pytest.raises(AxiomError) as e:
        train(micro_config("micro_batch_size=4", "grad_accum_steps=1", "max_steps=2"), tiny_data, tmp_path / "run")
    assert failures == [4]
    assert str(e.value) == (
        "out of memory at micro-batch 4 (step 1: CUDA out of memory. Tried to allocate 2.00 GiB (simulated)); try "
        "--set gradient_checkpointing=true, or --set micro_batch_size=2 --set grad_accum_steps=2"
    )
    # checkpointing on already: not named as a way on (it was, whatever the run's setting)
    failures = _fail_once_at(monkeypatch, 1)
    checkpointed = micro_config("micro_batch_size=1", "gradient_checkpointing=true", "max_steps=2")
    with pytest.raises(AxiomError) as e:
        train(checkpointed, tiny_data, tmp_path / "checkpointed")
    assert failures == [1]
    assert str(e.value).endswith("(simulated)); try a device with more memory")


def test_out_of_memory_in_the_update_is_never_run_again(tiny_data, tmp_path, monkeypatch):
    """An out-of-memory inside optimizer.step() (its state allocated parameter by parameter) may come after some
    parameters were updated: backing off and running the step again would update those twice. It is an error, with
    the ways on that can help (a smaller micro-batch does not), even where the plan chose the micro-batch."""
    _fail_in_the_update(monkeypatch)
    auto = micro_config("micro_batch_size=auto", "grad_accum_steps=4", "max_steps=2")
    with pytest.raises(
        AxiomError,
        match=r"^out of memory in the optimizer's update \(CUDA out of memory\. Tried to "
        r"allocate 64\.00 MiB \(simulated\)\): .* whatever the micro-batch; shard them",
    ):
        train(auto, tiny_data, tmp_path / "run")
    assert "out of memory at micro-batch" not in (tmp_path / "run" / "train.log").read_text()  # no back-off


@pytest.mark.parametrize("where", ["planned", "given", "update"])
def test_out_of_memory_after_a_checkpoint_leaves_it_as_it_was(where, tiny_data, tmp_path, monkeypatch):
    """An out-of-memory at step 3, after the checkpoint of step 2: backed off (a micro-batch the plan chose), or an
    error (one set by hand, or in the update, some parameters updated already). The checkpoint is byte-identical to
    what it was when the allocator failed, it verifies, and no checkpoint holds the failed step's weights."""
    run, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    settings = ("max_steps=4", "eval_interval=4", "checkpoint_interval=2")
    before: dict[str, str] = {}

    def snapshot():
        assert [step for step, _ in list_checkpoints(checkpoints)] == [2]
        before.update(hashes(checkpoints / "step_000002"))

    if where == "update":
        _fail_in_the_update(monkeypatch, nth=3, at_failure=snapshot)
    else:
        failures = _fail_once_at(monkeypatch, 4, nth=3, at_failure=snapshot)
    batch = "micro_batch_size=auto" if where == "planned" else "micro_batch_size=4"
    cfg = micro_config(batch, "grad_accum_steps=4" if where == "planned" else "grad_accum_steps=1", *settings)
    if where == "planned":
        assert train(cfg, tiny_data, run).step == 4
        assert "notice: out of memory at micro-batch 4 (step 3): micro-batch 2" in (run / "train.log").read_text()
    else:
        with pytest.raises(AxiomError, match=r"^out of memory (at micro-batch 4 \(step 3: |in the optimizer's upd)"):
            train(cfg, tiny_data, run)
        assert [step for step, _ in list_checkpoints(checkpoints)] == [2]
    assert before and hashes(checkpoints / "step_000002") == before
    verify_checkpoint(checkpoints / "step_000002", need_state=True)
    if where == "given":
        assert failures == [4]
        monkeypatch.undo()
        assert train(cfg, tiny_data, run, resume=True).step == 4  # the run goes on from it


def test_crash_while_writing_checkpoint_leaves_previous_loadable(tiny_data, tmp_path, monkeypatch):
    cfg = micro_config("max_steps=6", "eval_interval=6", "checkpoint_interval=2")
    run = tmp_path / "run"
    real_save = checkpointer_mod.save_training_state

    def crash_on_second(state, directory):
        if state["step"] == 4:  # the weights are already in the temporary directory: die mid-checkpoint
            raise KeyboardInterrupt
        real_save(state, directory)

    monkeypatch.setattr(checkpointer_mod, "save_training_state", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_data, run)
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert not list((run / "checkpoints").glob(".step_000004.tmp*"))  # an interrupted write removes its temporary
    model, _, meta = load_model(run / "checkpoints" / "step_000002")
    assert meta["step"] == 2

    def disk_full_on_second(state, directory):
        if state["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "state.pt"))
        real_save(state, directory)

    monkeypatch.setattr(checkpointer_mod, "save_training_state", disk_full_on_second)
    with pytest.raises(AxiomError) as e:  # the resumed run meets a full disk at the same checkpoint: one line
        train(cfg, tiny_data, run, resume=True)
    assert re.fullmatch(
        rf"{re.escape(str(run / 'checkpoints' / 'step_000004'))}: cannot write \S+/state\.pt \(no space left on the "
        r"device\); the folder was not replaced and earlier checkpoints are intact; free space and resume",
        str(e.value),
    )
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2]
    assert not list((run / "checkpoints").glob(".step_000004.tmp*"))
    monkeypatch.setattr(checkpointer_mod, "save_training_state", real_save)
    resumed = train(cfg, tiny_data, run, resume=True)
    assert resumed.step == 6 and [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4, 6]
    reference = tmp_path / "reference"
    train(cfg, tiny_data, reference)
    assert_same_weights(final_weights(run), final_weights(reference))


def _axiom_cmd(*args):
    return [sys.executable, "-m", "axiom.cli", *args]


def test_kill_9_then_resume_is_bit_identical(tiny_data, tmp_path):
    extra = ("max_steps=40", "eval_interval=10", "checkpoint_interval=2")
    reference = tmp_path / "reference"
    train(micro_config(*extra), tiny_data, reference)
    run = tmp_path / "run"
    cmd = _axiom_cmd("train", "--data", str(tiny_data), "--out", str(run), *micro_args(*extra))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}  # same threads and numbers; no spinning on busy cores
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        while not (run / "checkpoints" / "step_000004").exists():  # then kill it wherever it is
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished: 36 steps were still to go
    assert not (run / "checkpoints" / "step_000040").exists()
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    assert_same_weights(final_weights(run), final_weights(reference))
    ref_losses = [r["loss"] for r in read_rows(reference / "train.csv")]
    assert [r["loss"] for r in read_rows(run / "train.csv")] == ref_losses


def torchrun_train(
    data: Path, run: Path, tmp_path: Path, *args: str, program: tuple[str, ...] = ("-m", "axiom.cli")
) -> subprocess.CompletedProcess:
    """`axiom train` under torchrun: two gloo processes on the CPU, each running `program`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun leaves its log folders there
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd = [*torchrun, *program, "train", "--data", str(data), "--out", str(run), "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def train_on_two_processes(data: Path, run: Path, tmp_path: Path, *args: str) -> None:
    done = torchrun_train(data, run, tmp_path, *args)
    assert done.returncode == 0, done.stderr[-3000:]


def test_an_error_under_torchrun_is_said_once(tiny_data, tmp_path):
    """Every process meets a bad --set (or a missing --data) alike, and each printed it: one line per GPU."""
    done = torchrun_train(tiny_data, tmp_path / "run", tmp_path, *micro_args("lr_max=fast"))
    assert done.returncode != 0
    error = "axiom train: error: --set lr_max=fast: expected float"
    assert done.stderr.count(error) == 1, done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr  # the others exit alike, or are stopped by torchrun: none succeeds
    assert "ChildFailedError" in done.stderr  # then torchrun's own report
    # one process with a LOCAL_RANK another tool set (a scheduler's): it is the only one, and says its error
    alone = {**os.environ, "LOCAL_RANK": "1"}
    cmd = [sys.executable, "-m", "axiom.cli", "train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")]
    done = subprocess.run(cmd, env=alone, capture_output=True, text=True)
    assert done.returncode == 2 and "axiom train: error: " in done.stderr


def test_a_missing_data_under_torchrun_is_said_by_the_first_process_also_when_it_starts_late(tmp_path):
    """The second process met the error first and exited at once, and torchrun stopped the first before it said it:
    torchrun's report (exitcode 2) and no error line at all. The others now wait for torchrun to stop them."""
    # the first process starts a second after the other, as on a loaded machine
    late_first = (
        "import os, sys, time\nif os.environ['LOCAL_RANK'] == '0':\n    time.sleep(1)\nfrom axiom.cli import main\n"
    )
    late_first += "sys.exit(main())"
    missing, run = tmp_path / "missing", tmp_path / "run"
    done = torchrun_train(missing, run, tmp_path, program=("--no-python", sys.executable, "-c", late_first))
    assert done.returncode != 0
    error = (
        f"axiom train: error: {missing}/manifest.json not found: {missing} is not a prepared data directory; run "
        "`axiom prepare`\n"
    )
    assert done.stderr.count("axiom train: error: ") == 1 and error in done.stderr, done.stderr[-3000:]
    assert not run.exists()
    # the first process is the failure torchrun reports; torchrun stopped the other (SIGTERM) before its wait ran out
    assert re.search(
        r"Root Cause[^\n]*\n\[0\]:\n.*\n.*\n  rank      : 0 \(local_rank: 0\)\n  exitcode  : 2 ", done.stderr
    )
    assert "exitcode  : -15" in done.stderr
    assert done.stderr.count("Traceback") == 1 and "ChildFailedError" in done.stderr  # torchrun's own report alone


def test_a_kills_leftover_and_a_one_process_checkpoint_resume_alike_on_every_fsdp_rank(tiny_data, tmp_path):
    """Rank 0 puts back what a kill left (a checkpoint set aside mid-replacement) while the others chose where to
    resume, each by itself: they could resume from different steps (data read twice and skipped, then a hang).
    And a checkpoint of one process (or DDP) keys its optimizer state by place, which FSDP's loader matched to
    nothing: AdamW restarted from zero moments, and the next save failed."""
    extra = ("eval_interval=100", "checkpoint_interval=2", "decay_fraction=0")  # the same LRs for 6 steps as for 8
    reference = tmp_path / "reference"
    train(micro_config("max_steps=8", *extra), tiny_data, reference)
    run = tmp_path / "run"
    train(micro_config("max_steps=6", *extra), tiny_data, run)
    (run / "checkpoints" / "step_000006").rename(run / "checkpoints" / ".step_000006.old")
    train_on_two_processes(tiny_data, run, tmp_path, "--resume", *micro_args("max_steps=8", "fsdp=true", *extra))
    log = (run / "train.log").read_text()
    assert re.search(r"cleaned up: restored \S+/checkpoints/step_000006 from \S+/checkpoints/\.step_000006\.old\n", log)
    assert re.search(r"resumed from \S+/checkpoints/step_000006 at step 6 \(", log), log
    losses = lambda d: [float(r["loss"]) for r in read_rows(d / "train.csv")]  # noqa: E731
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    resumed, straight = final_weights(run), final_weights(reference)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-5)
    # the one process's generators went to both ranks: each is reseeded apart (dropout masks)
    rngs = load_training_state(list_checkpoints(run / "checkpoints")[-1][1])["rng"]
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


def test_an_auto_micro_batch_run_resumes_on_another_process_count_the_way_its_refusal_says(tiny_data, tmp_path):
    """One process's plan records its split (4 sequences: micro-batch 4 x 1), which 2 processes cannot share: the
    refusal named no way on. The one it names now continues the run, equal to one never stopped within rounding."""
    extra = ("micro_batch_size=auto", "grad_accum_steps=4", "eval_interval=100", "checkpoint_interval=2")
    extra = (*extra, "decay_fraction=0")  # the same LRs for 4 steps as for 6
    reference, run = tmp_path / "reference", tmp_path / "run"
    train(micro_config("max_steps=6", *extra), tiny_data, reference)
    train(micro_config("max_steps=4", *extra), tiny_data, run)
    assert json.loads((run / "config.json").read_text())["train"]["grad_accum_steps"] == 1
    files = lambda: {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    refused = torchrun_train(tiny_data, run, tmp_path, "--resume", "--set", "max_steps=6")
    assert files() == before
    way = "; to keep the step's 4 sequences: --set micro_batch_size=auto --set grad_accum_steps=4 (the plan splits"
    assert "grad_accum_steps=1 is not divisible by the 2 processes" + way in refused.stderr, refused.stderr[-3000:]
    flags = way.split(": ", 1)[1].split(" (")[0].split()
    train_on_two_processes(tiny_data, run, tmp_path, "--resume", "--set", "max_steps=6", *flags)
    assert "micro-batch 2 x 2 accumulation (auto)" in (run / "train.log").read_text()
    losses = lambda d: [float(r["loss"]) for r in read_rows(d / "train.csv")]  # noqa: E731
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)  # summed in another order: not bit for bit
    resumed, straight = final_weights(run), final_weights(reference)
    for k in straight:
        torch.testing.assert_close(resumed[k], straight[k], rtol=1e-4, atol=1e-5)
    # a step that no split over 2 processes keeps
    odd = uneven_split(micro_config("micro_batch_size=auto", "grad_accum_steps=3").train, 2)
    assert odd.endswith(
        "by the 2 processes, nor are the step's 3 sequences; run on a process count that divides 3, "
        "or change the step (grad_accum_steps: tokens per step change)"
    )


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one(tiny_data, tmp_path, fsdp):
    extra = ("max_steps=4", "eval_interval=4", "checkpoint_interval=4")
    single = tmp_path / "single"
    train(micro_config(*extra), tiny_data, single)
    extra = (*extra, f"fsdp={fsdp}")
    run = tmp_path / "ranks"
    train_on_two_processes(tiny_data, run, tmp_path, *micro_args(*extra))
    assert "2 processes" in (run / "train.log").read_text()
    ddp = [float(r["loss"]) for r in read_rows(run / "train.csv")]
    one = [float(r["loss"]) for r in read_rows(single / "train.csv")]
    assert ddp == pytest.approx(one, rel=1e-5)
    val = lambda d: float(read_rows(d / "eval.csv")[-1]["val_loss"])  # noqa: E731
    assert val(run) == pytest.approx(val(single), rel=1e-5)
    ddp_weights, one_weights = final_weights(run), final_weights(single)
    for k in one_weights:
        torch.testing.assert_close(ddp_weights[k], one_weights[k], rtol=1e-4, atol=1e-5)
    # each rank draws its own dropout masks: its generator is seeded with seed + rank (all were the same)
    rngs = load_training_state(list_checkpoints(run / "checkpoints")[-1][1])["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


def test_init_from_starts_a_new_run_from_checkpoint_weights(tiny_data, tmp_path, capsys):
    from axiom.cli import main

    source = tmp_path / "source"
    train(micro_config("max_steps=12", "eval_interval=12"), tiny_data, source)
    trained_val = float(read_rows(source / "eval.csv")[-1]["val_loss"])
    run = tmp_path / "continued"
    args = ["train", "--data", str(tiny_data), "--out", str(run), "--init-from", str(source / "checkpoints" / "best")]
    # the model's shape comes from the checkpoint (a different d_model here is refused), training fields from --set
    assert main([*args, *micro_args("max_steps=4", "d_model=64")]) == 2
    # a run's folder names its checkpoints (it said model.safetensors was not found, after reading the run's config)
    assert main([*args[:-1], str(source), *micro_args("max_steps=4")]) == 2
    assert f"{source} is a run's folder, not a checkpoint; pass one of its checkpoints: {source}/checkpoints/best" in (
        capsys.readouterr().err
    )
    assert main([*args, *micro_args("max_steps=4", "eval_interval=4")]) == 0
    rows = read_rows(run / "eval.csv")
    assert [int(r["step"]) for r in rows] == [0, 4]
    assert float(rows[0]["val_loss"]) == pytest.approx(trained_val, rel=1e-6)  # step 0 evaluates the loaded weights


def test_a_fine_tune_killed_before_its_first_checkpoint_resumes_from_the_same_weights(tiny_data, tmp_path, capsys):
    """A run begun with --init-from and killed before its first checkpoint: `--resume` alone started it again from
    random weights, and `--init-from X --resume` was refused; a scheduler needs one command line that always works."""
    from axiom.cli import main

    source = tmp_path / "source"
    train(micro_config("max_steps=12", "eval_interval=12"), tiny_data, source)
    best = source / "checkpoints" / "best"
    trained_val = float(read_rows(source / "eval.csv")[-1]["val_loss"])
    run = tmp_path / "tune"
    args = ["train", "--data", str(tiny_data), "--out", str(run), *micro_args("max_steps=4", "eval_interval=4")]
    assert main([*args, "--init-from", str(best)]) == 0
    for step in (run / "checkpoints").glob("step_*"):  # as if killed before its first checkpoint
        shutil.rmtree(step)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    began = best.resolve()
    assert err == (
        f"axiom train: error: --resume: {run} has no complete checkpoint yet and began from --init-from {began}; pass "
        f"--init-from {began} --resume to start it again from those weights (or delete {run}/started_from.json to "
        "start it from others)\n"
    )
    assert main([*args, "--init-from", str(best), "--resume"]) == 0  # starts again from the same weights
    assert f"starting fresh from the weights of {best}" in (run / "train.log").read_text()
    rows = read_rows(run / "eval.csv")
    assert [int(r["step"]) for r in rows] == [0, 4]
    assert float(rows[0]["val_loss"]) == pytest.approx(trained_val, rel=1e-6)
    # with a checkpoint, the same command line continues it
    assert main([*args[:-4], *micro_args("max_steps=6", "eval_interval=4"), "--init-from", str(best), "--resume"]) == 0
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "not read, the run continues its checkpoint" in log
    assert [s for s, _ in list_checkpoints(run / "checkpoints")][-1] == 6
    assert main([*args, "--init-from", str(best), "--resume-from", str(best)]) == 2
    assert "--resume-from excludes --resume and --init-from" in capsys.readouterr().err
    # a base that moved since (another mount, a renamed folder) is taken from where it is now
    for step in (run / "checkpoints").glob("step_*"):
        shutil.rmtree(step)
    moved = source.rename(tmp_path / "moved") / "checkpoints" / "best"
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2  # not from new weights: where it went is asked for
    assert capsys.readouterr().err == (
        f"axiom train: error: --resume: {run} has no complete checkpoint yet and began from --init-from {began}, "
        f"which is no longer there; pass --init-from ITS_NEW_PATH --resume to start it again from those weights (or "
        f"delete {run}/started_from.json to start it from others)\n"
    )
    assert main([*args, "--init-from", str(moved), "--resume"]) == 0
    assert json.loads((run / "started_from.json").read_text())["init_from"] == str(moved.resolve())


def test_train_from_config_files(tiny_data, tmp_path, capsys):
    """--config: a TOML file of [model]/[train] values (--set on top), a run's config.json for --resume (its own is
    no change, another run's model is refused), and configs/sft.toml as shipped, with --init-from."""
    from axiom.cli import main

    tables = {"model": [], "train": []}
    for item in MICRO:
        name, value = item.split("=")
        value = value if re.fullmatch(r"[0-9.e+-]+", value) else f'"{value}"'
        tables["model" if name in ModelConfig.__dataclass_fields__ else "train"].append(f"{name} = {value}")
    micro = tmp_path / "micro.toml"
    micro.write_text("".join(f"[{t}]\n" + "\n".join(lines) + "\n" for t, lines in tables.items()))
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), "--config", str(micro)]
    assert main([*args, "--set", "max_steps=4", "--set", "eval_interval=4"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved == micro_config("max_steps=4", "eval_interval=4").to_dict()
    resume = ["train", "--data", str(tiny_data), "--out", str(run), "--resume"]
    assert main([*resume, "--config", str(run / "config.json")]) == 0
    assert main([*resume, "--config", str(micro), "--set", "max_steps=4", "--set", "eval_interval=4"]) == 0  # re-run
    assert "training fields changed" not in (run / "train.log").read_text()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**saved, "model": {**saved["model"], "d_model": 64}}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*resume, "--config", str(other)]) == 2
    assert capsys.readouterr().err == (
        "axiom train: error: --resume: --set and --config may change training fields only, not the model's shape of "
        "the checkpoint (d_model 32 -> 64)\n"
    )
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    sft = Path(__file__).resolve().parent.parent / "configs" / "sft.toml"
    tuned = tmp_path / "tuned"
    small = [
        "seq_len=32",
        "micro_batch_size=2",
        "grad_accum_steps=2",
        "max_steps=2",
        "eval_tokens=256",
        "optimizer=adamw",
    ]
    init = ["--init-from", str(run / "checkpoints" / "best"), "--data", str(tiny_data), "--out", str(tuned)]
    assert main(["train", "--config", str(sft), *init, *(a for s in small for a in ("--set", s))]) == 0
    train_cfg = json.loads((tuned / "config.json").read_text())["train"]
    assert (train_cfg["lr_max"], train_cfg["warmup_steps"], train_cfg["eval_interval"]) == (3e-5, 30, 100)
    assert (train_cfg["seq_len"], train_cfg["max_steps"]) == (32, 2)
