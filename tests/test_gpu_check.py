"""scripts/gpu_check.sh: its CPU smoke mode runs every part at tiny sizes, so the GPU check cannot rot."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _corpus(path: Path) -> Path:
    """Enough real-looking text for a few tiny training steps and a val split."""
    lines = [
        "In the beginning God created the heaven and the earth.",
        "And the earth was without form, and void; and darkness was upon the face of the deep.",
        "And God said, Let there be light: and there was light.",
        "It is a truth universally acknowledged, that a single man in possession of a good fortune must be in want.",
    ]
    docs = (f"Chapter {i}. " + " ".join(lines[i % 4 :] * 6) for i in range(300))  # distinct: the split hashes text
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


@pytest.mark.slow
def test_smoke_mode_runs_every_part_and_writes_its_table(tmp_path):
    out = tmp_path / "check"
    cmd = [
        "bash",
        str(ROOT / "scripts" / "gpu_check.sh"),
        str(out),
        "--smoke",
        "--corpus",
        str(_corpus(tmp_path / "c.jsonl")),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "gpu_check.json").read_text())
    parts = results["parts"]
    assert set(parts) == {
        "decode_profile_b1",
        "decode_profile_b16",
        "memory",
        "train_mb2",
        "decode",
        "prepare",
        "training",
    }
    assert all(part.get("ok", True) for part in parts.values()), parts
    for batch in (1, 16):  # where one decoding step's time goes, on the CPU's default path
        part = parts[f"decode_profile_b{batch}"]
        profile = part["decode_step_profile"]
        assert part["batch"] == batch and part["decoding"] == "eager (dynamic cache)" and profile["steps"] == 8
        assert profile["step_ms"] > 0 and profile["host_ms"] > 0 and profile["wait_ms"] == 0
        assert "kernels" not in profile  # CUDA only
        assert "Self CPU time total" in (out / f"decode_profile_b{batch}.log").read_text()  # the profiler's table
    assert parts["memory"]["peak_mem_bytes"] > 0 and parts["train_mb2"]["ratio_vs_hf"] > 0
    assert parts["decode"]["tokens_per_s"] > 0 and parts["decode"]["same_tokens_as_hf"] == 1.0
    val = parts["training"]["val_loss"]
    assert len(val) == 3 and val[-1] < val[0]
    table = (out / "gpu_check.md").read_text()
    assert table.startswith("GPU check (CPU smoke mode)") and "| train tiny, 4 steps on c.jsonl, AdamW" in table
    assert "| loss falls | met |" in table and "FAILED" not in table
    assert "| decode step tiny, batch 16 (profile) | " in table
    assert table in done.stdout  # the table is the last thing printed (the device tool returns the output's end)


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_the_budget_cuts_a_part_short_and_skips_the_rest(tmp_path, monkeypatch):
    """The whole check fits its budget (the device tool's 10 minutes a command): a part runs for what is left of
    it at most, and once too little is left the remaining parts are reported as not run."""
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check.Check, "MIN_PART_SECONDS", 0.5)
    check = gpu_check.Check(tmp_path, smoke=True, budget=1.5)
    start = time.monotonic()
    assert check.run("slow", [sys.executable, "-c", "import time; time.sleep(60)"], timeout=300) is None
    assert check.run("next", [sys.executable, "-c", "print('never')"], timeout=300) is None
    assert time.monotonic() - start < 10
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert parts["slow"]["error"].startswith("timed out after") and "TIMEOUT" in (tmp_path / "slow.log").read_text()
    assert parts["next"]["error"] == "not run: the check's 1.5 s budget was spent"
    assert not (tmp_path / "next.log").exists()
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| next | not run: the check's 1.5 s budget was spent |  | FAILED |" in table


def test_full_mode_needs_a_gpu(tmp_path, capsys):
    gpu_check = _gpu_check()
    if gpu_check_has_cuda():
        pytest.skip("a CUDA device is visible: the full check would run")
    assert gpu_check.main([str(tmp_path / "out"), "--corpus", str(_corpus(tmp_path / "c.jsonl"))]) == 2
    assert "no CUDA device is visible; use --smoke" in capsys.readouterr().out
    assert gpu_check.main([str(tmp_path / "out"), "--corpus", str(tmp_path / "missing")]) == 2
    assert f"--corpus {tmp_path / 'missing'} not found" in capsys.readouterr().out


def test_parts_run_only_what_is_asked_in_the_checks_order(tmp_path, monkeypatch, capsys):
    gpu_check = _gpu_check()
    ran = []
    for name in ("decode_profile", "memory_profile", "throughput_sweep", "decode", "training_run"):
        monkeypatch.setattr(gpu_check, name, lambda check, *args, name=name, **kw: ran.append(name))
    missing = str(tmp_path / "missing")  # no corpus needed without the training run
    assert (
        gpu_check.main([str(tmp_path / "out"), "--smoke", "--parts", "decode,decode_profile", "--corpus", missing]) == 0
    )
    assert ran == ["decode_profile", "decode"]
    assert gpu_check.main([str(tmp_path / "out"), "--smoke", "--parts", "tests", "--corpus", missing]) == 2
    message = "--parts tests: choose among decode_profile, memory, throughput, decode, training"
    assert message in capsys.readouterr().out


def gpu_check_has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
