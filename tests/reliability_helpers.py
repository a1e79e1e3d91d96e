"""Shared by the tests/test_reliability*.py files: a small run with checkpoints, file hashes, one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import micro_config, save_model

from axiom.cli import main
from axiom.model.checkpoint import save_training_state, step_dir_name, write_dir_atomic
from axiom.model.transformer import Axiom

REPO = Path(__file__).resolve().parent.parent


def make_run(root: Path) -> Path:
    """RUN/checkpoints/{step_000002, step_000004} (with state.pt) and best, RUN/eval.csv and train.log."""
    cfg = micro_config()
    run = root / "run"
    torch.manual_seed(0)
    model = Axiom(cfg.model)
    for step in (2, 4):

        def write(tmp: Path, step: int = step) -> None:
            save_model(model, cfg, tmp, step=step, tokens=step * 128)
            save_training_state({"step": step, "moments": torch.randn(64)}, tmp)

        write_dir_atomic(run / "checkpoints" / step_dir_name(step), write)
    write_dir_atomic(run / "checkpoints" / "best", lambda tmp: save_model(model, cfg, tmp, step=4, tokens=512))
    (run / "eval.csv").write_text("step,tokens,train_loss,val_loss\n0,0,,6.2\n2,256,6.1,6.0\n4,512,5.9,5.8\n")
    (run / "train.log").write_text("a log\n")
    return run


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (or of the file itself), keyed by path: compare before and after."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fails(capsys, argv: list[str], *fragments: str) -> str:
    """Run `axiom ARGV` in-process: exit status 2, no traceback, and the last stderr line is the one-line error
    holding every fragment. Returns that line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err
    line = lines[-1]
    assert line.startswith(f"axiom {argv[0]}: error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


def succeeds(capsys, argv: list[str]) -> str:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return captured.out


def axiom_process(*args: str, **kw) -> subprocess.Popen:
    """`python -m axiom.cli ARGS` as a child process (for signals and kill -9), this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-m", "axiom.cli", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path
