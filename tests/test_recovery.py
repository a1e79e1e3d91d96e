"""Training faults (issue 9): a loss blow-up, a poisoned batch that breaks the weights, kill -9 during recovery,
runs into used directories, --resume / --resume-from / --init-from. Checkpoints only ever hold healthy weights."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
from conftest import (
    MICRO_VOCAB,
    micro_args,
    micro_config,
    read_rows,
    save_model,
    signalled_train_step,
    write_micro_dataset,
)
from reliability_helpers import fails, hashes
from safetensors.torch import load_file

import axiom.train.launch as launch
import axiom.train.trainer as trainer_mod
from axiom.cli import main
from axiom.data.loader import TokenStream
from axiom.errors import AxiomError
from axiom.files import output_lock
from axiom.model.checkpoint import list_checkpoints, load_model, load_training_state, read_meta, write_checksums
from axiom.model.transformer import Axiom
from axiom.train.launch import train
from axiom.train.optim import build_optimizer, lr_at
from axiom.train.plot import plot_losses, plot_run, pyplot, read_curves
from axiom.train.recovery import EVENT_COLUMNS
from axiom.train.step import train_step

POISON_AT = 48  # loader position (windows) of the poisoned batch: read by step 13 (4 windows a step)


def weight_dirs(run: Path) -> list[Path]:
    """Every folder under RUN/checkpoints holding weights: step, best and set-aside checkpoints."""
    return sorted(p.parent for p in (run / "checkpoints").glob("*/model.safetensors"))


def assert_all_finite(run: Path) -> None:
    for d in weight_dirs(run):
        for name, tensor in load_file(d / "model.safetensors").items():
            assert torch.isfinite(tensor).all(), (d, name)


def poisoned_step(real_step):
    """Trainer.step, but the step that reads the batch at POISON_AT (first epoch) leaves non-finite weights, as a
    corrupt batch or a bad update would. Keyed to the loader position, so a rollback skips it for good."""

    def step(self):
        poison = self.loader.epoch == 0 and self.loader.position == POISON_AT
        result = real_step(self)
        if poison:
            with torch.no_grad():
                self.raw.norm.weight.fill_(float("nan"))
        return result

    return step


POISON_SCRIPT = f"""
import sys
import axiom.train.trainer as trainer
from axiom.cli import main
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_recovery import poisoned_step
trainer.Trainer.step = poisoned_step(trainer.Trainer.step)
sys.exit(main(sys.argv[1:]))
"""
RECOVERY = ("max_steps=60", "eval_interval=4", "checkpoint_interval=4", "max_bad_steps=3", "rollback_lr_steps=8")


def test_a_loss_spike_makes_no_update():
    cfg = micro_config()
    torch.manual_seed(0)
    model = trainer_mod.Axiom(cfg.model)
    opt = build_optimizer(model, cfg.train, "cpu")[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, MICRO_VOCAB, (2, 32))
    spike = train_step(model, opt, [(x, x)], 1e-3, cfg.train, max_loss=1.0)  # an untrained loss is ~6.2
    assert spike.skipped and math.isfinite(spike.loss) and spike.loss > 1.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    taken = train_step(model, opt, [(x, x)], 1e-3, cfg.train, max_loss=100.0)
    assert not taken.skipped and not torch.equal(model.embed.weight, before["embed.weight"])


def test_loss_blowup_stops_without_naming_a_broken_checkpoint(tiny_data, tmp_path):
    # lr 1e3: step 1's update wrecks the weights (its own loss is still normal) and every later loss is ~1e6
    cfg = micro_config("max_steps=40", "checkpoint_interval=1", "eval_interval=5", "lr_max=1e3")
    run = tmp_path / "run"
    with pytest.raises(AxiomError) as e:
        train(cfg, tiny_data, run)
    msg = str(e.value)
    assert msg.startswith("training stopped at step 11: 10 steps in a row were skipped (the last: loss ")
    assert "> spike_factor 2 x average" in msg
    assert msg.endswith(
        "; no checkpoint precedes the bad steps; lower lr_max or check the data, then start again "
        "(--resume starts fresh)"
    )
    # step 1 was written (it looked healthy), then proved broken by step 2: set aside, so --resume starts fresh
    assert list_checkpoints(run / "checkpoints") == []
    assert (run / "checkpoints" / "abandoned-step_000001" / "model.safetensors").is_file()
    assert load_model(run / "checkpoints" / "best")[2]["step"] == 0  # best/ still holds the untrained baseline
    log = (run / "train.log").read_text()
    assert re.search(
        r"^step 2: loss \S+ > spike_factor 2 x average \S+; skipped \(1 in a row, limit max_bad_steps=10\)$", log, re.M
    )
    assert "checkpoint postponed until the bad steps end" in log
    assert_all_finite(run)
    resumed = train(micro_config("max_steps=4", "eval_interval=4"), tiny_data, run, resume=True)
    assert resumed.step == 4 and resumed.history[-1].loss < resumed.history[0].loss
    assert "has no complete checkpoint yet; starting fresh from new weights" in (run / "train.log").read_text()
    assert [int(r["step"]) for r in read_rows(run / "eval.csv")] == [0, 4]  # no rows of the failed attempt


def test_poisoned_batch_rolls_back_skips_it_and_finishes(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod.Trainer, "step", poisoned_step(trainer_mod.Trainer.step))
    cfg = micro_config(*RECOVERY, "max_steps=30")
    run = tmp_path / "run"
    result = train(cfg, tiny_data, run)
    assert result.step == 30 and result.stopped is None
    # step 13 broke the weights (its own loss was fine), steps 14-16 were skipped, then back to step 12
    log = (run / "train.log").read_text()
    assert "step 14: non-finite loss nan or grad norm nan; skipped (1 in a row, limit max_bad_steps=3)" in log
    assert (
        "step 16: 3 steps in a row were skipped (the last: non-finite loss nan or grad norm nan); rolled back to "
        f"{run / 'checkpoints' / 'step_000012'} (rollback 1 of at most 3), skipping the 16 windows read since; "
        "lr x 0.5 until step 20"
    ) in log
    events = read_rows(run / "events.csv")
    assert tuple(events[0]) == EVENT_COLUMNS and len(events) == 1
    assert {k: events[0][k] for k in ("step", "event", "from_step", "skipped_windows", "lr_scale")} == {
        "step": "12",
        "event": "rollback",
        "from_step": "16",
        "skipped_windows": "16",
        "lr_scale": "0.5",
    }
    # the csvs tell the trajectory of the final weights: steps 13-16 of the abandoned branch are gone
    assert [int(r["step"]) for r in read_rows(run / "eval.csv")] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    rows = {int(r["step"]): r for r in read_rows(run / "train.csv")}
    assert list(rows) == list(range(1, 31)) and all(r["skipped"] == "0" for r in rows.values())
    assert float(rows[13]["lr"]) == lr_at(12, cfg.train) * 0.5 and float(rows[21]["lr"]) == lr_at(20, cfg.train)
    evals = {int(r["step"]): r for r in read_rows(run / "eval.csv")}
    assert all(evals[step]["lr"] == rows[step]["lr"] for step in (16, 20, 24))  # the last step's, lowered or not
    state = load_training_state(list_checkpoints(run / "checkpoints")[-1][1])
    assert state["rollbacks"][0]["from_step"] == 16 and state["bad_steps"] == 0
    assert_all_finite(run)
    assert plot_run(run).stat().st_size > 0
    figure = pyplot().figure()
    plot_losses(figure.add_subplot(), *read_curves(run))  # the rollback: dashed where the run continued (step 12)
    assert [line.get_xdata()[0] for line in figure.axes[0].get_lines() if line.get_linestyle() == "--"] == [12 * 128]
    pyplot().close(figure)


def test_a_run_out_of_rollbacks_stops_naming_the_last_checkpoint_that_verifies(tiny_data, tmp_path, monkeypatch):
    """max_rollbacks spent (0 here): training stops naming the checkpoint --resume continues from, the newest that a
    later step proved healthy and whose files verify: step 12's were damaged as the bad step ran, so step 8."""
    poisoned = poisoned_step(trainer_mod.Trainer.step)

    def step(self):
        if self.loader.epoch == 0 and self.loader.position == POISON_AT:
            weights = tmp_path / "run" / "checkpoints" / "step_000012" / "model.safetensors"
            weights.write_bytes(bytes(weights.stat().st_size))  # same size, other bytes: only its hash can tell
        return poisoned(self)

    monkeypatch.setattr(trainer_mod.Trainer, "step", step)
    run = tmp_path / "run"
    with pytest.raises(AxiomError) as e:
        train(micro_config(*RECOVERY, "max_steps=24", "max_rollbacks=0", "keep_checkpoints=4"), tiny_data, run)
    step_8, step_12 = run / "checkpoints" / "step_000008", run / "checkpoints" / "step_000012"
    assert str(e.value) == (
        "training stopped at step 16: 3 steps in a row were skipped (the last: non-finite loss nan or grad norm nan), "
        f"after 0 rollbacks (max_rollbacks=0); the last good checkpoint is {step_8}; lower lr_max or check the data, "
        "then --resume"
    )
    assert f"{step_12} does not verify, so it is not rolled back to: " in (run / "train.log").read_text()
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 8]  # step 12 set aside: --resume takes 8
    assert (run / "checkpoints" / "abandoned-step_000012" / "model.safetensors").is_file()


def test_ctrl_c_in_a_streak_of_bad_steps_writes_no_checkpoint(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) during step 14, inside the streak of bad steps the poisoned batch begins: the stop writes no
    checkpoint of the broken weights and says so (--resume continues from step 12: as after a kill -9 in the streak,
    test_kill_9_during_recovery_resumes_exactly)."""
    monkeypatch.setattr(trainer_mod.Trainer, "step", poisoned_step(trainer_mod.Trainer.step))
    monkeypatch.setattr(trainer_mod, "train_step", signalled_train_step(14, signal.SIGINT))
    run = tmp_path / "run"
    result = train(micro_config(*RECOVERY, "max_steps=20"), tiny_data, run)
    assert (result.stopped, result.step) == ("SIGINT", 14)
    stopped = (
        "stopped by SIGINT at step 14: no checkpoint is written during a streak of bad steps; continue with --resume"
    )
    assert stopped in (run / "train.log").read_text()
    assert [s for s, _ in list_checkpoints(run / "checkpoints", complete=False)] == [4, 8, 12]
    assert_all_finite(run)


POISON_ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def poisoned_train(tiny_data, tmp_path_factory):
    """(the command of a poisoned run into a folder, the run of it without a kill): one reference for every kill."""
    script = tmp_path_factory.mktemp("poisoned") / "poisoned_train.py"
    script.write_text(POISON_SCRIPT)

    def cmd(run: Path) -> list[str]:
        return [
            sys.executable,
            str(script),
            "train",
            "--data",
            str(tiny_data),
            "--out",
            str(run),
            *micro_args(*RECOVERY),
        ]

    reference = script.parent / "reference"
    done = subprocess.run(cmd(reference), capture_output=True, text=True, env=POISON_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    return cmd, reference


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", ["skipped (1 in a row", "rolled back to"], ids=["in-streak", "after-rollback"])
def test_kill_9_during_recovery_resumes_exactly(poisoned_train, tmp_path, kill_after):
    cmd, reference = poisoned_train
    run = tmp_path / "run"
    proc = subprocess.Popen(cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=POISON_ENV)
    log = run / "train.log"
    try:
        while not (log.is_file() and kill_after in log.read_text()):
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (run / "checkpoints" / "step_000060").exists()
    done = subprocess.run([*cmd(run), "--resume"], capture_output=True, text=True, env=POISON_ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    final = lambda r: load_file(list_checkpoints(r / "checkpoints")[-1][1] / "model.safetensors")  # noqa: E731
    ours, theirs = final(run), final(reference)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert [r["loss"] for r in read_rows(run / "train.csv")] == [r["loss"] for r in read_rows(reference / "train.csv")]
    assert read_rows(run / "events.csv") == read_rows(reference / "events.csv")
    assert_all_finite(run)


def test_fresh_run_into_a_used_directory_is_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), *micro_args("max_steps=2", "eval_interval=2")]
    assert main(args) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"axiom train: error: {run} already holds a run; pass --resume to continue it, or choose a new --out"
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_is_idempotent_for_schedulers(tiny_data, tmp_path, capsys):
    """One command line for any preemption: no run yet, killed before the first checkpoint, or mid-run."""
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--out", str(run), "--resume"]
    args += micro_args("max_steps=6", "eval_interval=3", "checkpoint_interval=3")
    assert main(args) == 0  # no run directory at all: starts fresh
    assert "has no complete checkpoint yet; starting fresh" not in capsys.readouterr().out
    reference = load_file(run / "checkpoints" / "step_000006" / "model.safetensors")
    # as if killed before the first checkpoint: a config, a log and the step-0 eval row, no checkpoint
    for d in (run / "checkpoints").iterdir():
        if d.name != "best":
            for f in d.iterdir():
                f.unlink()
            d.rmdir()
    (run / "events.csv").write_text(",".join(EVENT_COLUMNS) + "\n2,256,rollback,3,4,0.5,spike\n")  # the old run's
    assert main(args) == 0
    assert f"--resume: {run} has no complete checkpoint yet; starting fresh from new weights" in capsys.readouterr().out
    assert [int(r["step"]) for r in read_rows(run / "eval.csv")] == [0, 3, 6]
    assert (run / "events.csv").read_text() == ",".join(EVENT_COLUMNS) + "\n"  # none of this run's
    again = load_file(run / "checkpoints" / "step_000006" / "model.safetensors")
    assert all(torch.equal(again[k], reference[k]) for k in reference)
    assert main(args) == 0  # finished: resumes at the last step and does nothing more
    assert "resumed from" in capsys.readouterr().out


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", str(tiny_data), "--out", str(run)]
    sets = micro_args("max_steps=8", "eval_interval=4", "checkpoint_interval=2", "keep_checkpoints=10")
    assert main([*base, *sets]) == 0
    original = load_file(run / "checkpoints" / "step_000008" / "model.safetensors")
    older = run / "checkpoints" / "step_000004"
    assert main([*base, *sets, "--resume-from", str(older)]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [
        "abandoned-step_000006",
        "abandoned-step_000008",
        "best",
        "step_000002",
        "step_000004",
        "step_000006",
        "step_000008",
    ]
    redone = load_file(run / "checkpoints" / "step_000008" / "model.safetensors")
    assert all(torch.equal(redone[k], original[k]) for k in original)  # resume is exact, so the branch repeats
    assert [int(r["step"]) for r in read_rows(run / "eval.csv")] == [0, 4, 8]
    log = (run / "train.log").read_text()
    for step in ("step_000006", "step_000008"):
        newer = run / "checkpoints" / step
        assert f"set aside {newer} (after the checkpoint training continues from) as abandoned-{step}" in log
    other = tmp_path / "other"
    assert main(["train", "--data", str(tiny_data), "--out", str(other), *sets]) == 0
    capsys.readouterr()
    theirs = other / "checkpoints" / "step_000002"
    fails(
        capsys,
        [*base, *sets, "--resume-from", theirs],
        f"--resume-from {theirs}: not a checkpoint of {run}; continue it into an empty --out",
    )
    assert main([*base, *sets, "--resume", "--init-from", str(older)]) == 2


def test_a_best_written_after_the_resumed_checkpoint_is_replaced_only_by_a_lower_loss(tiny_data, tmp_path):
    """best/ of steps after the checkpoint a run continues from (a kill between an evaluation and the next
    checkpoint, --resume-from an older one) is the run's lowest loss so far: a worse branch never replaces it."""
    run = tmp_path / "run"
    base = ["train", "--data", str(tiny_data), "--out", str(run)]
    sets = micro_args("max_steps=8", "eval_interval=4", "checkpoint_interval=4", "keep_checkpoints=10")
    assert main([*base, *sets]) == 0
    best = run / "checkpoints" / "best"
    kept = {p.name: p.read_bytes() for p in best.iterdir()}
    low = float(read_rows(run / "eval.csv")[-1]["val_loss"])
    assert read_meta(best)["step"] == 8
    longer = shutil.copytree(run, tmp_path / "longer")
    older = run / "checkpoints" / "step_000004"
    assert main([*base, *sets, "--set", "lr_max=0.5", "--resume-from", str(older)]) == 0  # a worse branch
    assert float(read_rows(run / "eval.csv")[-1]["val_loss"]) > low
    assert {p.name: p.read_bytes() for p in best.iterdir()} == kept
    assert f"best/ (step 8, val loss {low:.4f}) stays until an evaluation is lower" in (run / "train.log").read_text()
    # a branch that goes lower replaces it, at its lowest evaluation
    more = ["--set", "max_steps=16", "--resume-from", str(longer / "checkpoints" / "step_000004")]
    assert main(["train", "--data", str(tiny_data), "--out", str(longer), *sets, *more]) == 0
    evals = {int(r["step"]): float(r["val_loss"]) for r in read_rows(longer / "eval.csv")}
    lowest = min(evals, key=evals.get)
    assert evals[lowest] < low and read_meta(longer / "checkpoints" / "best")["step"] == lowest


def test_init_from_a_hugging_face_folder(tiny_data, tmp_path):
    pytest.importorskip("transformers")
    from axiom.interop.export import export

    source = tmp_path / "source"
    train(micro_config("max_steps=6", "eval_interval=6"), tiny_data, source)
    trained_val = float(read_rows(source / "eval.csv")[-1]["val_loss"])
    for fmt in ("llama", "axiom"):  # either export format
        hf = export(source / "checkpoints" / "best", tmp_path / fmt, fmt=fmt)
        run = tmp_path / f"continued_{fmt}"
        args = ["train", "--data", str(tiny_data), "--out", str(run), "--init-from", str(hf)]
        assert main([*args, *micro_args("max_steps=1", "eval_interval=1")]) == 0
        rows = read_rows(run / "eval.csv")
        assert float(rows[0]["val_loss"]) == pytest.approx(trained_val, rel=1e-6), fmt


def test_a_checkpoint_of_axiom_import_starts_a_run_with_init_from_and_resume_from_says_so(tiny_data, tmp_path, capsys):
    """train, export, import, train again: the imported checkpoint holds weights without training state, so
    --resume-from refuses it in one line naming --init-from, which starts a new run from exactly those weights."""
    pytest.importorskip("transformers")
    source, hf, ckpt, run = (tmp_path / name for name in ("source", "hf", "ckpt", "run"))
    sets = micro_args("max_steps=2", "eval_interval=2", "checkpoint_interval=2")
    assert main(["train", "--data", str(tiny_data), "--out", str(source), *sets]) == 0
    assert main(["export", "--ckpt", str(source / "checkpoints" / "best"), "--out", str(hf), "--format", "llama"]) == 0
    assert main(["import", "--hf", str(hf), "--out", str(ckpt)]) == 0
    capsys.readouterr()
    again = ["train", "--data", str(tiny_data), "--out", str(run), *sets]
    assert main([*again, "--resume-from", str(ckpt)]) == 2
    assert capsys.readouterr().err == (
        f"axiom train: error: --resume-from {ckpt}: weights without training state (no state.pt: optimizer, loader "
        f"position, RNG), so training cannot continue from it; --init-from {ckpt} starts a new run (a new --out) "
        "from its weights\n"
    )
    assert not run.exists()
    assert main([*again, "--init-from", str(ckpt)]) == 0
    log = (run / "train.log").read_text()
    assert f"--init-from {ckpt}: a new run from its weights, at step 0 with a fresh optimizer\n" in log
    rows = read_rows(run / "eval.csv")
    assert [int(r["step"]) for r in rows] == [0, 2]  # from step 0, not the imported checkpoint's step 2
    # its first evaluation is axiom eval's of the imported checkpoint, and the source run's last: the same weights
    capsys.readouterr()
    args = ["eval", "--ckpt", str(ckpt), "--data", str(tiny_data), "--eval-tokens", "256", "--device", "cpu", "--json"]
    assert main(args) == 0
    imported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert float(rows[0]["val_loss"]) == imported == float(read_rows(source / "eval.csv")[-1]["val_loss"])


def test_resume_skips_a_corrupt_newest_checkpoint(tiny_data, tmp_path):
    sets = micro_args("max_steps=8", "eval_interval=4", "checkpoint_interval=2", "keep_checkpoints=4")
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["train", "--data", str(tiny_data), "--out", str(reference), *sets]) == 0
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, "--set", "max_steps=6"]) == 0
    newest = run / "checkpoints" / "step_000006" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-100:] = bytes(100)  # same size, different bytes: only the content hash can tell
    newest.write_bytes(data)
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, "--resume"]) == 0
    log = (run / "train.log").read_text()
    corrupt = f"({newest}: content differs from its SHA-256 in checksums.json (corrupt); use another checkpoint)"
    assert f"--resume: skipped {newest.parent}, which does not verify {corrupt}" in log
    assert f"resumed from {run / 'checkpoints' / 'step_000004'} at step 4" in log
    assert (run / "checkpoints" / "abandoned-step_000006" / "model.safetensors").read_bytes() == bytes(data)
    ours = load_file(run / "checkpoints" / "step_000008" / "model.safetensors")
    theirs = load_file(reference / "checkpoints" / "step_000008" / "model.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_two_runs_into_one_directory_and_outputs_over_inputs(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    sets = micro_args("max_steps=100000", "eval_interval=400", "checkpoint_interval=400")  # killed long before
    cmd = [sys.executable, "-m", "axiom.cli", "train", "--data", str(tiny_data), "--out", str(run), *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not (run / "train.log").is_file():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.01)
        assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, "--resume"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"axiom train: error: {run} is being written by axiom train (pid {proc.pid} on ")
        assert re.search(r", since \d\d:\d\d:\d\d\); wait for it to finish or stop it, then run axiom train again", err)
        assert "\n" not in err
        # the first undisturbed: its lock and its run as they were
        assert f'"pid": {proc.pid}' in (tmp_path / ".run.lock").read_text()
        assert json.loads((run / "config.json").read_text())["train"]["max_steps"] == 100000
        assert proc.poll() is None
    finally:
        proc.kill()  # kill -9: the kernel releases the lock
        proc.wait()
    with output_lock(run, "train"):
        pass
    # the run directory may not be, contain or lie inside the data, --init-from or an eval_tasks file
    for out, how in ((tiny_data, "is"), (tiny_data / "run", "lies inside"), (tiny_data.parent, "contains")):
        before = hashes(tiny_data)
        message = (
            f"--out {out} {how} --data {tiny_data}: an output must not overlap an input; choose an --out outside it"
        )
        fails(capsys, ["train", "--data", tiny_data, "--out", out, *sets], message)
        assert hashes(tiny_data) == before
    base = tmp_path / "base"  # a checkpoint to start from
    base.mkdir()
    save_model(Axiom(micro_config().model), micro_config(), base)
    fails(
        capsys,
        ["train", "--data", tiny_data, "--out", base / "run", "--init-from", base, *sets],
        f"lies inside --init-from {base}: ",
    )
    (tasks := tmp_path / "tasks").mkdir()
    (tasks / "t.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n')
    overlap = f"--out {tasks} contains eval_tasks {tasks / 't.jsonl'}: an output must not overlap an input"
    fails(
        capsys,
        ["train", "--data", tiny_data, "--out", tasks, *sets, "--set", f"eval_tasks={tasks / 't.jsonl'}"],
        overlap,
    )
    assert not (base / "run").exists() and [p.name for p in tasks.iterdir()] == ["t.jsonl"]


def test_data_ids_beyond_the_model_vocabulary(tiny_data, tmp_path, capsys):
    """Refused where the id is read, before any update: in a shard's first tokens (checked as it opens), else by the
    first batch, evaluation's (step 0's) or training's, that reads one."""
    sets = micro_args("max_steps=2", "vocab_size=100", "eval_tokens=8192")  # tiny_data's ids reach 440
    why = "; the model's vocab_size is 100: use a model with cl100k_base's 100,277 ids"
    line = fails(capsys, ["train", "--data", tiny_data, "--out", tmp_path / "run", *sets], why)
    assert f"error: {tiny_data / 'train_00000.bin'}: token id " in line
    head = TokenStream.HEAD_CHECK
    clean = [[(7 * d + i) % 90 + 1 for i in range(39)] for d in range(300)]  # 40 tokens each, EOS (0) included
    past_head = [doc if d * 40 < head else [440, *doc[1:]] for d, doc in enumerate(clean)]
    for split, train_docs, val_docs in (("val", clean[:20], past_head), ("train", past_head, clean[:20])):
        data, run = tmp_path / f"{split}_data", tmp_path / f"{split}_run"
        write_micro_dataset(data, train_docs, val_docs)
        line = fails(capsys, ["train", "--data", data, "--out", run, *sets], why)
        found = re.search(
            rf"error: {re.escape(str(data / f'{split}_00000.bin'))}: token id 440 at token ([\d,]+);", line
        )
        assert found and int(found[1].replace(",", "")) >= head, line
        assert not (run / "train.csv").is_file() or read_rows(run / "train.csv") == []  # no step done
        assert list_checkpoints(run / "checkpoints") == []


def test_resume_sets_aside_a_checkpoint_missing_a_file(tiny_data, tmp_path):
    """A step folder that lacks a file is skipped like a corrupt one and set aside the same way: training reaching
    its step again writes a new one beside it, never over it."""
    run = tmp_path / "run"
    sets = micro_args("max_steps=4", "eval_interval=4", "checkpoint_interval=2", "keep_checkpoints=4")
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets]) == 0
    damaged = run / "checkpoints" / "step_000004"
    (damaged / "state.pt").unlink()
    kept = {p.name: p.read_bytes() for p in damaged.iterdir()}
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, "--resume"]) == 0
    log = (run / "train.log").read_text()
    missing = f"({damaged / 'state.pt'}: no such file or directory (listed in checksums.json); use another checkpoint)"
    assert f"--resume: skipped {damaged}, which does not verify {missing}" in log
    assert f"set aside {damaged} (after the checkpoint training continues from) as abandoned-step_000004" in log
    assert {p.name: p.read_bytes() for p in damaged.with_name("abandoned-step_000004").iterdir()} == kept
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]  # written anew beside them


def test_resume_where_no_checkpoint_verifies_changes_nothing(tiny_data, tmp_path, capsys):
    """Every checkpoint damaged (a bad copy, a deleted file): --resume started the run again from step 0 and cleared
    its csvs, exit 0; it stops in one line instead, everything as it was."""
    run = tmp_path / "run"
    sets = micro_args("max_steps=4", "eval_interval=2", "checkpoint_interval=2", "keep_checkpoints=4")
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets]) == 0
    for step in ("step_000002", "step_000004"):
        (run / "checkpoints" / step / "model.safetensors").unlink()
    before = hashes(run)
    capsys.readouterr()
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"axiom train: error: --resume: none of the 2 checkpoints of {run} verifies (the newest, ")
    assert err.endswith(
        "; nothing was changed: restore one and --resume again, start a new run from weights with --init-from "
        f"{run / 'checkpoints' / 'best'} and a new --out, or move {run} away to start this run again"
    )
    assert "\n" not in err
    assert hashes(run) == before


def test_resume_on_data_prepared_again_is_refused(tmp_path, capsys):
    """Data prepared again between a stop and --resume (a source edited: 5 more tokens, the same number of windows)
    was trained on at the old positions without a word."""
    docs = [[(7 * d + i) % 500 + 1 for i in range(40)] for d in range(24)]
    data, run = tmp_path / "data", tmp_path / "run"
    write_micro_dataset(data, docs, docs[:4])
    args = ["train", "--data", str(data), "--out", str(run), *micro_args("max_steps=4", "checkpoint_interval=2")]
    assert main([*args, "--set", "max_steps=2"]) == 0
    shutil.rmtree(data)
    write_micro_dataset(data, [*docs[:-1], docs[-1] + list(range(1, 6))], docs[:4])
    before = hashes(run)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"axiom train: error: {data} is not the data {run / 'checkpoints' / 'step_000002'} was")
    ckpt = run / "checkpoints" / "step_000002"
    assert "(train_tokens " in err and "\n" not in err
    assert err.endswith(
        f"; continue on that data, or start a new run (a new --out) from its weights with --init-from {ckpt}"
    )
    assert hashes(run) == before
    # the same tokens, split otherwise (another fraction or seed), or cut into other documents: refused alike
    shutil.rmtree(data)
    write_micro_dataset(data, docs, docs[:4])
    manifest = json.loads((data / "manifest.json").read_text())
    for key, value in (("val_fraction", 0.1), ("split_seed", 7), ("train_docs", 23)):
        changed = json.loads(json.dumps(manifest))
        (changed["split"] if key in changed["split"] else changed)[key] = value
        (data / "manifest.json").write_text(json.dumps(changed))
        fails(capsys, [*args, "--resume"], f"was trained on ({key} ")
    assert hashes(run) == before


def test_resume_from_best_says_what_it_holds_and_what_to_pass(tiny_data, tmp_path, capsys):
    """best/ holds weights without training state: --resume-from names the step checkpoint of the same step (or
    --init-from); a run directory is named as one."""
    run = tmp_path / "run"
    base = ["train", "--data", str(tiny_data), "--out", str(run)]
    sets = micro_args("max_steps=4", "eval_interval=4", "checkpoint_interval=4")
    assert main([*base, *sets]) == 0
    best, same = run / "checkpoints" / "best", run / "checkpoints" / "step_000004"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*base, *sets, "--resume-from", str(best)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"axiom train: error: --resume-from {best}: weights without training state (no state.pt: optimizer, loader "
        f"position, RNG), so training cannot continue from it; --resume-from {same} continues from the same step"
    )
    shutil.rmtree(same)
    before = {p: v for p, v in before.items() if not p.is_relative_to(same)}
    assert main([*base, *sets, "--resume-from", str(best)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"; --init-from {best} starts a new run (a new --out) from its weights")
    assert main([*base, *sets, "--resume-from", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"axiom train: error: --resume-from {run}: a run directory, not a checkpoint; --resume")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_resume_reads_its_checkpoints_config_once_for_its_checks(tiny_data, tmp_path, monkeypatch):
    """The data check and the changed-fields line each read the checkpoint's config.json (loading the model
    verifies its own copy against checksums.json)."""
    run = tmp_path / "run"
    sets = micro_args("max_steps=2", "eval_interval=2", "checkpoint_interval=2")
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets]) == 0
    reads = []
    monkeypatch.setattr(launch, "read_meta", lambda path: reads.append(path) or read_meta(path))
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, "--resume", "--set", "max_steps=3"]) == 0
    assert reads == [run / "checkpoints" / "step_000002"]
    assert "training fields changed from the checkpoint's: max_steps 2 -> 3" in (run / "train.log").read_text()


def test_extending_a_finished_run_says_the_lr_jumps(tiny_data, tmp_path, capsys):
    """The schedule is a function of the run's length: --set max_steps=N on a finished run warms the LR back up, and
    a notice says so before training, with the setting that continues from the checkpoint's LR instead."""
    run = tmp_path / "run"
    sets = micro_args("max_steps=4", "eval_interval=4", "checkpoint_interval=4")
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets]) == 0
    quiet = tmp_path / "quiet"
    shutil.copytree(run, quiet)
    capsys.readouterr()
    longer = ["--resume", "--set", "max_steps=8"]
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, *longer]) == 0
    notice = (
        "notice: the LR jumps from 0.0003 to 0.003 at step 4: the schedule is a function of the run's length and "
        "settings, which the resumed run changed; to continue from 0.0003 instead: --set lr_max=0.0003 "
        "(docs/training.md#extending-a-finished-run)"
    )
    assert notice in capsys.readouterr().err.splitlines()
    log = (run / "train.log").read_text()
    assert "--resume: training fields changed from the checkpoint's: max_steps 4 -> 8" in log
    assert log.index(notice) < log.index("schedule     8 steps")  # before the plan and the first step
    assert float(read_rows(run / "train.csv")[4]["lr"]) == pytest.approx(3e-3)
    shorter = ["--resume", "--set", "max_steps=6"]  # a run shortened to before its checkpoint: said, not silent
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets, *shorter]) == 0
    err = capsys.readouterr().err
    assert "notice: the checkpoint is at step 8, past the run's 6 steps: nothing to train" in err
    assert "LR jumps" not in err
    # the setting it suggests keeps the LR where the checkpoint left it: no notice
    assert main(["train", "--data", str(tiny_data), "--out", str(quiet), *sets, *longer, "--set", "lr_max=3e-4"]) == 0
    assert "notice: the LR jumps" not in capsys.readouterr().err
    assert float(read_rows(quiet / "train.csv")[4]["lr"]) == pytest.approx(3e-4)


def test_resume_into_a_checkpoint_a_file_or_another_programs_folder_is_refused_and_changes_nothing(
    tiny_data, tmp_path, capsys
):
    """--resume that finds no checkpoint starts a fresh run in a used folder only if that folder holds a run: a
    checkpoint given as --out, or a folder of something else, used to get a new run's config.json over its own."""
    run = tmp_path / "run"
    base = ["train", "--data", str(tiny_data), *micro_args("max_steps=2", "eval_interval=2", "checkpoint_interval=2")]
    assert main([*base, "--out", str(run)]) == 0
    best, step = run / "checkpoints" / "best", run / "checkpoints" / "step_000002"
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    afile = tmp_path / "afile"
    afile.write_text("hi")
    before = hashes(tmp_path)
    for out, message in [
        (
            best,
            f"--out {best} is a checkpoint, not a run's folder; --resume-from {best} continues from it into its own "
            f"run's --out, --init-from {best} starts a new run (a new --out) from its weights",
        ),
        (step, f"--out {step} is a checkpoint, not a run's folder"),
        (
            other,
            f"--out {other} holds files but no run of axiom train; nothing was written: choose an empty or new --out "
            "(its config.json is not a run's)",
        ),
        (afile, f"--out {afile} is a regular file, not a folder; choose a folder for the run"),
    ]:
        fails(capsys, [*base, "--out", out, "--resume"], message)
    fails(capsys, [*base, "--out", afile], "is a regular file, not a folder")
    assert hashes(tmp_path) == before
    (preempted := tmp_path / "preempted").mkdir()  # a scheduler's log written there before the run starts: fresh
    (preempted / "slurm.out").write_text("job 42 started")
    assert main([*base, "--out", str(preempted), "--resume"]) == 0 and (preempted / "checkpoints").is_dir()
    assert (preempted / "slurm.out").read_text() == "job 42 started"


def test_a_run_that_cannot_start_leaves_its_folder_as_it_found_it(tiny_data, tmp_path, capsys):
    """A new run whose setup fails (a bad --init-from, a micro-batch the data cannot fill) leaves no folder, or an
    empty one, so the corrected command runs; a refused resume leaves the run's config.json as it was."""
    run = tmp_path / "run"
    base = ["train", "--data", str(tiny_data), *micro_args("max_steps=2", "eval_interval=2", "checkpoint_interval=2")]
    assert main([*base, "--out", str(run)]) == 0
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    fails(capsys, [*base, "--out", new, "--init-from", run], "is a run's folder, not a checkpoint")
    fails(capsys, [*base, "--out", empty, "--set", "micro_batch_size=4000"])
    assert not new.exists() and list(empty.iterdir()) == []
    assert main([*base, "--out", str(new), "--init-from", str(run / "checkpoints" / "best")]) == 0
    before = hashes(run / "config.json")
    fails(capsys, [*base, "--out", run, "--resume", "--set", "seq_len=16"], "seq_len")
    assert hashes(run / "config.json") == before


def test_resume_trains_with_the_betas_and_weight_decay_it_is_given(tiny_data, tmp_path):
    """A resumed run's optimizer takes the config's betas and weight decay, not the checkpoint's (which its state
    brings back): train.log said "changed", yet the weights were those of an unchanged resume."""
    sets = ("eval_interval=4", "checkpoint_interval=2")
    run = tmp_path / "run"
    train(micro_config(*sets, "max_steps=2"), tiny_data, run)
    same, changed = shutil.copytree(run, tmp_path / "same"), shutil.copytree(run, tmp_path / "changed")
    train(micro_config(*sets, "max_steps=4"), tiny_data, same, resume=True)
    other = micro_config(*sets, "max_steps=4", "weight_decay=0.0", "beta1=0.5", "beta2=0.9")
    train(other, tiny_data, changed, resume=True)
    assert "weight_decay 0.1 -> 0.0" in (changed / "train.log").read_text()
    groups = load_training_state(changed / "checkpoints" / "step_000004")["optimizer"]["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups] == [(0.0, (0.5, 0.9)), (0.0, (0.5, 0.9))]
    ours = load_file(changed / "checkpoints" / "step_000004" / "model.safetensors")
    theirs = load_file(same / "checkpoints" / "step_000004" / "model.safetensors")
    assert not all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_drops_a_torn_csv_tail(tiny_data, tmp_path):
    """A crash of the machine can leave NUL bytes or half a row at the end of train.csv or eval.csv; --resume drops
    them with the rest of what was logged past its checkpoint (it used to fail on them, at every retry)."""
    cfg = micro_config("max_steps=4", "eval_interval=2", "checkpoint_interval=2")
    reference, run = tmp_path / "reference", tmp_path / "run"
    train(cfg, tiny_data, reference)
    train(cfg, tiny_data, run)
    shutil.rmtree(run / "checkpoints" / "step_000004")
    with open(run / "train.csv", "ab") as f:
        f.write(bytes(64))
    with open(run / "eval.csv", "a") as f:
        f.write("x1,2")
    train(cfg, tiny_data, run, resume=True)
    evals = lambda r: [(row["step"], row["val_loss"]) for row in read_rows(r / "eval.csv")]  # noqa: E731
    losses = lambda r: [(row["step"], row["loss"]) for row in read_rows(r / "train.csv")]  # noqa: E731
    assert evals(run) == evals(reference) and [step for step, _ in evals(run)] == ["0", "2", "4"]
    assert losses(run) == losses(reference)


class TensorBoardView:
    """torch's SummaryWriter, keeping the scalars as TensorBoard shows a run's folder: a writer opened with
    `purge_step` (TensorBoard's restart marker) discards what earlier writers logged at that step and after."""

    scalars: list[tuple[str, int, float]] = []

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        if purge_step is not None:
            self.scalars[:] = [(tag, step, v) for tag, step, v in self.scalars if step < purge_step]

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, step, value))

    def close(self) -> None:
        pass


def test_tensorboard_shows_each_step_once_after_a_rollback_and_a_resume(tiny_data, tmp_path, monkeypatch):
    """TensorBoard kept the rows of the abandoned branch (a NaN loss at steps 14-16) beside the ones logged again
    after a rollback or a resume: steps shown twice, with different values. It must show what the csvs hold."""
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))  # installed, as far as axiom looks
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=TensorBoardView))
    monkeypatch.setattr(TensorBoardView, "scalars", [])
    monkeypatch.setattr(trainer_mod.Trainer, "step", poisoned_step(trainer_mod.Trainer.step))
    cfg, run = micro_config(*RECOVERY, "max_steps=24"), tmp_path / "run"
    train(cfg, tiny_data, run, tensorboard=True)  # rolls back from step 16 to 12
    train(cfg, tiny_data, run, resume_from=run / "checkpoints" / "step_000020", tensorboard=True)
    for csv_name, column in (("train.csv", "loss"), ("eval.csv", "val_loss")):
        tag = f"{csv_name.removesuffix('.csv')}/{column}"
        shown = [(step, v) for name, step, v in TensorBoardView.scalars if name == tag]
        assert shown == [(int(r["step"]), float(r[column])) for r in read_rows(run / csv_name)]
    assert [step for step, _ in shown] == [0, 4, 8, 12, 16, 20, 24]


class WandbView:
    """wandb as it keeps a project's runs: a run id's history outlives the process (`init` with the same id and
    resume="allow" continues it), and `log(..., step=N)` below the run's step is dropped, as wandb drops it."""

    runs: dict[str, list[dict]] = {}

    def __init__(self, id: str | None = None) -> None:
        self.id = id or f"new{len(self.runs)}"
        self.history = self.runs.setdefault(self.id, [])
        self.step = len(self.history)

    @classmethod
    def init(cls, project: str, dir: str, id: str | None = None, resume: str | None = None) -> WandbView:
        return cls(id)

    def define_metric(self, name: str, step_metric: str | None = None) -> None:
        pass

    def log(self, data: dict, step: int | None = None) -> None:
        if step is not None and step < self.step:
            return
        self.step = step if step is not None else self.step + 1
        self.history.append(data if step is None else {"step": step, **data})

    def finish(self) -> None:
        pass


def test_wandb_continues_its_run_and_keeps_the_values_logged_again(tiny_data, tmp_path, monkeypatch):
    """A resumed run started a new W&B run (its history split, and the steps the killed one logged past the
    checkpoint in neither), and after a rollback W&B refused the steps logged again (lower than its step): it kept
    the abandoned branch's NaN losses. One W&B run per run folder now, and each step's last value is the csv's."""
    monkeypatch.setitem(sys.modules, "wandb", WandbView)
    monkeypatch.setattr(WandbView, "runs", {})
    monkeypatch.setattr(trainer_mod.Trainer, "step", poisoned_step(trainer_mod.Trainer.step))
    cfg, run = micro_config(*RECOVERY, "max_steps=24"), tmp_path / "run"
    train(cfg, tiny_data, run, wandb_project="p")  # rolls back from step 16 to 12
    train(cfg, tiny_data, run, resume_from=run / "checkpoints" / "step_000020", wandb_project="p")
    assert list(WandbView.runs) == [(run / "wandb_run_id").read_text().strip()]
    for csv_name, column in (("train.csv", "loss"), ("eval.csv", "val_loss")):
        key = f"{csv_name.removesuffix('.csv')}/{column}"
        last = {row["step"]: row[key] for row in next(iter(WandbView.runs.values())) if key in row}
        rows = read_rows(run / csv_name)
        assert last == {int(r["step"]): float(r[column]) for r in rows}
    train(micro_config("max_steps=2"), tiny_data, tmp_path / "other", wandb_project="p")  # another run: its own
    assert len(WandbView.runs) == 2


@pytest.mark.parametrize("kind", ["empty", "wrong-types", "no-groups"])
def test_a_state_pt_of_another_shape_is_one_line(tiny_data, tmp_path, capsys, kind):
    """A state.pt that loads (weights only) but holds something else, its checksums written to match: KeyError,
    AttributeError and ValueError tracebacks on --resume-from."""
    run = tmp_path / "run"
    sets = micro_args("max_steps=2", "eval_interval=2", "checkpoint_interval=2")
    assert main(["train", "--data", str(tiny_data), "--out", str(run), *sets]) == 0
    ckpt = run / "checkpoints" / "step_000002"
    state = load_training_state(ckpt)
    crafted = {
        "empty": {},
        "wrong-types": {**state, "loader": "garbage", "rng": 5},
        "no-groups": {**state, "optimizer": {"state": {}, "param_groups": []}},
    }[kind]
    torch.save(crafted, ckpt / "state.pt")
    write_checksums(ckpt)
    message = {
        "empty": "state.pt is not a training state of axiom train (optimizer, loader, rng, step, tokens missing",
        "wrong-types": "state.pt is not a training state of axiom train (loader, rng missing or of another type)",
        "no-groups": "the checkpoint's optimizer state does not fit this model's parameters (ValueError",
    }[kind]
    args = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "more"), *sets, "--resume-from", str(ckpt)]
    fails(capsys, args, message)
