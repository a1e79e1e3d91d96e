"""Outputs never damage inputs: overlap, --force, one writer per output, crash leftovers, failed writes.

One test per fault class of issue 9 (docs/reliability.md lists them). Each asserts the exit status, the one-line
message and that the user's files are byte-identical afterwards. Inputs and checkpoints: test_reliability_inputs.py
and test_reliability_checkpoints.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import micro_config, save_model
from reliability_helpers import REPO, axiom_process, copy_run, fails, hashes, jsonl, make_run, succeeds

from axiom import files
from axiom.data import prepare as prep
from axiom.data import sources
from axiom.errors import AxiomError
from axiom.files import MARKER, check_no_overlap, output_lock
from axiom.model import checkpoint as ckpt_mod
from axiom.model.checkpoint import (
    clean_stale_checkpoints,
    list_checkpoints,
    prune_checkpoints,
    save_training_state,
    write_dir_atomic,
)
from axiom.model.transformer import Axiom

pytest.importorskip("transformers", reason="export writes transformers' files: pip install 'axiom-lm[hf]'")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("reliability"))


@pytest.fixture
def corpus(tmp_path):
    return jsonl(tmp_path / "c.jsonl", [f"document {i} " + "word " * (i % 17 + 3) for i in range(60)])


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- 1. outputs never overlap inputs; --force replaces only an earlier output of the same command


def test_outputs_never_overlap_inputs(run, corpus, tmp_path, capsys):
    best = run / "checkpoints" / "best"
    (tmp_path / "link").symlink_to(run)
    empty = tmp_path / "empty"
    (empty / "ckpt").mkdir(parents=True)
    save_model(*ckpt_mod.load_model(best)[:2], empty / "ckpt")
    data = tmp_path / "corpus"
    data.mkdir()
    jsonl(data / "a.jsonl", ["some text"] * 3)
    (tmp_path / "corpus-link").symlink_to(data)
    before, tree = hashes(run), paths(run, tmp_path)
    overlap = "an output must not overlap an input; choose an --out outside it"
    for out in (run / "hf", tmp_path / "link" / "hf", run / "checkpoints" / ".." / "hf", run / "checkpoints" / "new"):
        fails(capsys, ["export", "--ckpt", best, "--out", out], "lies inside the run of --ckpt", overlap)
    fails(capsys, ["export", "--ckpt", tmp_path / "link/checkpoints/best", "--out", run / "x"], "lies inside", overlap)
    fails(capsys, ["export", "--ckpt", empty / "ckpt", "--out", empty, "--force"], "--force replaces only")
    fails(capsys, ["import", "--hf", best, "--out", best / "sub"], "lies inside --hf", overlap)
    fails(capsys, ["plot", run, "--out", run / "eval.csv"], "is eval.csv", overlap)
    # prepare: the output is an input folder, lies inside one, or contains an input file (also through a link)
    fails(capsys, ["prepare", data, "--out", data], "is the input", overlap)
    fails(capsys, ["prepare", data, "--out", tmp_path / "corpus-link" / "out"], "lies inside the input", overlap)
    fails(capsys, ["prepare", data / "a.jsonl", "--out", tmp_path], "contains the input", overlap)
    assert hashes(run) == before and paths(run, tmp_path) == tree  # not even an empty folder or a lock is left
    with pytest.raises(AxiomError, match="contains the run"):
        check_no_overlap(run.parent, [("the run", run)])


def paths(*roots: Path) -> list[Path]:
    """Every file and folder under `roots`, empty ones included (hashes() sees files only)."""
    return sorted(p for root in roots for p in root.rglob("*"))


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux's unshare")
def test_a_bind_mount_of_an_input_overlaps_it(run, tmp_path):
    """A bind mount shows the same folder under another path, which no resolving of links reveals: the overlap is
    found by file identity. Mounted in a user namespace of its own (no root needed where the kernel allows it)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    check = (
        "import sys; from axiom.files import check_no_overlap; check_no_overlap(sys.argv[2], {'the run': sys.argv[1]})"
    )
    script = 'mount --bind "$1" "$2" || exit 99; exec "$3" -c "$4" "$1" "$2/hf"'
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["unshare", "-rm", "sh", "-c", script, "sh", run, mnt, sys.executable, check]
    done = subprocess.run(list(map(str, argv)), env=env, capture_output=True, text=True)
    if done.returncode == 99 or "unshare failed" in done.stderr:
        pytest.skip(f"no bind mount in a user namespace here: {done.stderr.strip()}")
    assert f"AxiomError: --out {mnt / 'hf'} lies inside the run {run}: an output must not overlap" in done.stderr


def test_force_replaces_only_an_earlier_output_of_the_same_command(run, tmp_path, capsys):
    best = run / "checkpoints" / "best"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not an export")
    before = hashes(run, mine)
    for cmd in (["export", "--ckpt", best], ["import", "--hf", tmp_path / "hf"]):
        fails(capsys, [*cmd, "--out", mine], "exists and is not empty; choose another --out")
        fails(capsys, [*cmd, "--out", mine, "--force"], "--force replaces only a folder written by", "left alone")
    fails(capsys, ["export", "--ckpt", best, "--out", run / "checkpoints" / "step_000002", "--force"], "left alone")
    whole = (
        f"{run}: --force replaces only a folder written by axiom export, and it holds no {MARKER}; it is left alone: "
    )
    fails(capsys, ["export", "--ckpt", best, "--out", run, "--force"], whole + "choose another --out")
    (tmp_path / "file.txt").write_text("x")
    fails(capsys, ["export", "--ckpt", best, "--out", tmp_path / "file.txt", "--force"], "exists and is a regular file")
    assert hashes(run, mine) == before
    hf = tmp_path / "hf"
    succeeds(capsys, ["export", "--ckpt", best, "--out", hf])
    assert json.loads((hf / MARKER).read_text())["command"] == "export"
    fails(capsys, ["export", "--ckpt", best, "--out", hf], "not empty; pass --force to replace it")
    (hf / "notes.txt").write_text("added to the export since")  # not the export's: --force keeps it
    kept = hashes(hf)
    fails(capsys, ["export", "--ckpt", best, "--out", hf, "--force"], "also holds notes.txt; it is left alone")
    assert hashes(hf) == kept
    (hf / "notes.txt").unlink()
    succeeds(capsys, ["export", "--ckpt", best, "--out", hf, "--force"])
    imported = tmp_path / "imported"
    succeeds(capsys, ["import", "--hf", hf, "--out", imported])
    fails(capsys, ["import", "--hf", hf, "--out", hf, "--force"], "it was written by axiom export")
    fails(capsys, ["export", "--ckpt", imported, "--out", imported, "--force"], "it was written by axiom import")
    succeeds(capsys, ["import", "--hf", hf, "--out", imported, "--force"])


def test_force_keeps_what_was_added_to_an_output_since(run, tmp_path, capsys):
    """--force replaces an earlier export or import only when the folder holds nothing but what its marker lists:
    a file or folder put there since is named and the whole folder is left as it was; so is a folder whose marker
    (an older axiom's) lists nothing."""
    best = run / "checkpoints" / "best"
    hf, imported = tmp_path / "hf", tmp_path / "imported"
    succeeds(capsys, ["export", "--ckpt", best, "--out", hf])
    succeeds(capsys, ["import", "--hf", hf, "--out", imported])
    marker = json.loads((imported / MARKER).read_text())
    assert marker["files"] == sorted(p.name for p in imported.iterdir() if p.name != MARKER)
    (imported / "eval").mkdir()
    (imported / "eval" / "scores.csv").write_text("task,acc\n")
    (imported / "empty").mkdir()
    kept = hashes(imported)
    line = fails(capsys, ["import", "--hf", hf, "--out", imported, "--force"], "left alone", "move those out")
    assert "the folder also holds empty/, eval/;" in line  # a folder of the user's is named once
    assert hashes(imported) == kept and (imported / "empty").is_dir()
    legacy = {k: v for k, v in json.loads((hf / MARKER).read_text()).items() if k != "files"}
    (hf / MARKER).write_text(json.dumps(legacy))
    kept = hashes(hf)
    fails(capsys, ["export", "--ckpt", best, "--out", hf, "--force"], "does not list the files", "delete the folder")
    assert hashes(hf) == kept


def test_an_interrupted_replacement_is_settled_and_checked_first(run, tmp_path, capsys):
    """A kill between atomic_dir's two renames leaves the old folder moved aside as .NAME.old and no NAME: the next
    export puts it back and checks it as it would NAME (it used to replace it without --force)."""
    best = run / "checkpoints" / "best"
    hf = tmp_path / "hf"
    succeeds(capsys, ["export", "--ckpt", best, "--out", hf])
    kept = hashes(hf)
    os.replace(hf, tmp_path / ".hf.old")
    fails(capsys, ["export", "--ckpt", best, "--out", hf], "not empty; pass --force to replace it")
    assert hashes(hf) == kept and not (tmp_path / ".hf.old").exists()


def test_kill_9_during_a_forced_export_leaves_one_complete_folder(run, tmp_path, capsys):
    best = run / "checkpoints" / "best"
    hf = tmp_path / "hf"
    succeeds(capsys, ["export", "--ckpt", best, "--out", hf])
    for delay in (0.0, 0.05, 0.3):  # after the temporary folder appears: while it fills, around the renames
        proc = axiom_process("export", "--ckpt", best, "--out", hf, "--force")
        while proc.poll() is None and not (tmp_path / f".hf.tmp-{proc.pid}").exists():
            time.sleep(0.005)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        folder = hf if hf.exists() else tmp_path / ".hf.old"
        written = json.loads((folder / MARKER).read_text())["files"]
        assert sorted(p.name for p in folder.iterdir() if p.name != MARKER) == written  # complete, old or new
        succeeds(capsys, ["export", "--ckpt", best, "--out", hf, "--force"])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_every_output_file_gets_the_umask_mode(run, corpus, tmp_path, capsys):
    """model.safetensors was written 0600 (safetensors' own mode) beside 0644 files: every file a command writes
    now gets the mode the umask gives (here 0002: 0664), checkpoints, exports, imports and shards alike."""
    previous = os.umask(0o002)
    try:
        assert files.file_mode() == 0o664
        write_dir_atomic(tmp_path / "ckpt", lambda tmp: save_model(Axiom(micro_config().model), micro_config(), tmp))
        succeeds(capsys, ["export", "--ckpt", run / "checkpoints" / "best", "--out", tmp_path / "hf"])
        succeeds(capsys, ["import", "--hf", tmp_path / "hf", "--out", tmp_path / "imported"])
        succeeds(capsys, ["prepare", corpus, "--out", tmp_path / "data", "--workers", "1", "--val-fraction", "0.2"])
    finally:
        os.umask(previous)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != corpus]
    assert {p.parent.name for p in written} == {"ckpt", "hf", "imported", "data"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o664" for p in written}


# ---- 4. one writer per output: the second names the holder and exits 2; a dead holder's lock is free


def test_second_writer_is_refused_and_a_dead_holder_frees_the_output(run, corpus, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from axiom.files import output_lock\n"
         "with output_lock(sys.argv[1], 'prepare'):\n    print('locked', flush=True); time.sleep(60)", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        named = f"is being written by axiom prepare (pid {holder.pid} on "
        line = fails(capsys, ["prepare", corpus, "--out", out, "--workers", "1"], named, "then run axiom prepare again")
        assert re.search(r", since \d\d:\d\d:\d\d\); wait for it to finish or stop it, then", line), line
        fails(capsys, ["export", "--ckpt", run / "checkpoints" / "best", "--out", out], named, "run axiom export again")
        fails(capsys, ["import", "--hf", tmp_path / "nowhere", "--out", out], named)
        assert not out.exists()
        out.mkdir()
        (tmp_path / "alias").symlink_to(out)  # another spelling of the same output shares its lock
        fails(capsys, ["prepare", corpus, "--out", tmp_path / "alias", "--workers", "1"], named)
        assert holder.poll() is None and f'"pid": {holder.pid}' in (tmp_path / ".out.lock").read_text()  # undisturbed
    finally:
        holder.kill()  # kill -9: the kernel releases the lock; the file it leaves behind means nothing
        holder.wait()
    assert (tmp_path / ".out.lock").exists()
    succeeds(capsys, ["prepare", corpus, "--out", out, "--workers", "1", "--val-fraction", "0.2"])
    assert not (tmp_path / ".out.lock").exists()
    with output_lock(out, "prepare"), pytest.raises(AxiomError, match=f"pid {os.getpid()}"), output_lock(out, "train"):
        pass


def test_lock_without_flock_falls_back_to_a_pid_file(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out, lock = tmp_path / "out", tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": os.uname().nodename, "command": "prepare"}))
    stale_taken = output_lock(out, "prepare")  # the holder is gone: stale
    with stale_taken, pytest.raises(AxiomError, match=f"axiom prepare \\(pid {os.getpid()}"), output_lock(out, "x"):
        pass
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": os.getppid(), "host": os.uname().nodename, "command": "train"}))
    with pytest.raises(AxiomError, match="being written by axiom train"), output_lock(out, "prepare"):
        pass


def test_a_lock_whose_holder_line_cannot_be_written_is_released(tmp_path, monkeypatch):
    """A full disk as the lock file gets our name: the error, and the lock released with its descriptor. The
    descriptor was left open, holding the flock, so that every later write of the same output in this process (a
    notebook, a server) was refused as "being written by" itself."""
    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(OSError, match="No space left"), output_lock(out, "prepare"):
        pass
    monkeypatch.setattr(os, "write", real_write)
    assert len(os.listdir("/proc/self/fd")) == before
    with output_lock(out, "prepare"):
        assert json.loads((tmp_path / ".out.lock").read_text())["pid"] == os.getpid()


# ---- 6. crash leftovers: pruning is crash-safe; each command removes its own stale temporaries


def test_crash_leftovers_are_hidden_and_cleaned_on_the_next_run(run, tmp_path, capsys, monkeypatch):
    r = copy_run(run, tmp_path / "run")
    root = r / "checkpoints"
    real_rmtree = ckpt_mod.shutil.rmtree

    def killed_mid_delete(path, ignore_errors=False):
        (next(p for p in sorted(path.iterdir()) if p.is_file())).unlink()  # one file gone, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(root, keep=1)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", real_rmtree)
    assert [s for s, _ in list_checkpoints(root)] == [4]  # the half-deleted one is hidden
    assert (root / ".step_000002.pruned").is_dir()
    # a kill inside write_dir_atomic: a temporary folder, and `best` moved aside before its replacement arrived
    (root / f".step_000006.tmp-{dead_pid()}").mkdir()
    os.replace(root / "best", root / ".best.old")
    shutil.copytree(root / "step_000004", root / ".step_000004.old")  # a kill after the new one took its place
    done = clean_stale_checkpoints(root)
    assert sorted(p.name for p in root.iterdir()) == ["best", "step_000004"]
    assert len(done) == 4 and sum(line.startswith(("restored", "removed the replaced")) for line in done) == 2
    assert ckpt_mod.load_model(root / "best")[2]["step"] == 4
    # export: a killed export's `.NAME.tmp-PID` goes when its PID is dead, not while it lives
    out = tmp_path / "hf"
    stale, live = tmp_path / f".hf.tmp-{dead_pid()}", tmp_path / f".hf.tmp-{os.getppid()}"
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    succeeds(capsys, ["export", "--ckpt", root / "best", "--out", out])
    assert not stale.exists() and live.exists()
    # prepare: a state temporary of a dead process
    data = tmp_path / "data"
    data.mkdir()
    (data / f".prepare-state.json.tmp-{dead_pid()}").write_text("{")
    inputs = [jsonl(tmp_path / "c.jsonl", ["a b c", "d e f"] * 9), "--workers", "1", "--val-fraction", "0.3"]
    succeeds(capsys, ["prepare", *inputs, "--out", data])
    assert not [p for p in data.iterdir() if ".tmp" in p.name]


# ---- failed writes (full disk, read-only target) are one line; nothing is replaced; the re-run recovers


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_writes_are_one_line_and_the_rerun_recovers(run, corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 300)  # several units
    args = ["--workers", "1", "--val-fraction", "0.2", "--shard-tokens", "100"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    succeeds(capsys, ["prepare", corpus, "--out", ref, *args])
    real_write, calls = prep.SplitWriter.write, []

    def full_after_a_while(self, tokens):
        calls.append(1)
        if len(calls) == 7:
            enospc()
        real_write(self, tokens)

    monkeypatch.setattr(prep.SplitWriter, "write", full_after_a_while)
    kept = f"{out}: cannot write (no space left on the device); the work recorded in {out / prep.STATE} is kept; "
    fails(capsys, ["prepare", corpus, "--out", out, *args], kept + "fix that, then run the same command again")
    assert json.loads((out / prep.STATE).read_text())["units_done"] == 3
    monkeypatch.setattr(prep.SplitWriter, "write", real_write)
    succeeds(capsys, ["prepare", corpus, "--out", out, *args])
    assert hashes(out) == {k.replace(str(ref), str(out)): v for k, v in hashes(ref).items()}

    # read-only targets: nothing is written, one line
    real_open = files.os.open

    def read_only(path, *a, **kw):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **kw)

    best = run / "checkpoints" / "best"
    with monkeypatch.context() as m:
        m.setattr(files.os, "open", read_only)
        for argv in (["prepare", corpus], ["export", "--ckpt", best], ["import", "--hf", tmp_path / "x"]):
            fails(capsys, [*argv, "--out", tmp_path / "ro"], "read-only file system", "nothing was")
    (tmp_path / "afile").write_text("a file where a folder is expected")
    for argv in (["prepare", corpus], ["export", "--ckpt", best], ["import", "--hf", run / "nowhere"]):
        fails(capsys, [*argv, "--out", tmp_path / "afile" / "out"], "cannot write", "afile is a regular file")
    fails(capsys, ["plot", run, "--out", tmp_path / "afile" / "loss.png"], "cannot write", "is unchanged")

    # a full disk during an export or a checkpoint: the previous folder is left as it was, no temporary remains
    hf = tmp_path / "hf"
    imported = tmp_path / "imported"
    succeeds(capsys, ["export", "--ckpt", best, "--out", hf])
    succeeds(capsys, ["import", "--hf", hf, "--out", imported])
    before = hashes(hf, imported, run)
    with monkeypatch.context() as m:
        m.setattr(ckpt_mod, "save_file", safetensors_disk_full)
        fails(capsys, ["export", "--ckpt", best, "--out", hf, "--force"], "no space left", "nothing was replaced")
        fails(capsys, ["import", "--hf", hf, "--out", imported, "--force"], "no space left", "nothing was replaced")
        m.setattr(ckpt_mod._WholeWrites, "write", enospc)
        model, cfg, _ = ckpt_mod.load_model(best)

        def write(tmp):
            save_model(model, cfg, tmp, step=6)
            save_training_state({"step": 6}, tmp)

        with pytest.raises(AxiomError, match="cannot write .*no space left.* earlier checkpoints are intact"):
            write_dir_atomic(run / "checkpoints" / "step_000004", write)
    assert hashes(hf, imported, run) == before
    assert not [p.name for p in [*tmp_path.iterdir(), *(run / "checkpoints").iterdir()] if ".tmp" in p.name]


def safetensors_disk_full(*args, **kwargs):
    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


# ---- SIGTERM and Ctrl-C stop prepare cleanly (pool workers too); the re-run finishes the same output


def test_sigterm_stops_prepare_with_workers_cleanly(tmp_path):
    """SIGTERM while pool workers are busy (the old code printed ~70 lines of BrokenPipeError from them)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(8):  # one unit each, ~2 MB: seconds of tokenizing even on fast cores
        line = json.dumps({"text": " ".join(f"{rng.getrandbits(20):x}" for _ in range(5000))}) + "\n"
        (corpus / f"{i}.jsonl").write_text(line * 50)
    out = tmp_path / "out"
    child = axiom_process("prepare", corpus, "--out", out, "--workers", "2", "--val-fraction", "0.2")
    deadline = time.monotonic() + 120
    while not (out / prep.STATE).exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the first unit is written: the workers are tokenizing the next ones
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert child.returncode == 130, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert lines[-1] == "axiom prepare: interrupted", err
    assert re.fullmatch(r"prepare: stopped after [0-7] of 8 units; run the same command again to continue", lines[-2])
    assert not (tmp_path / ".out.lock").exists() and not (out / "manifest.json").exists()
    prep.restore(out, json.loads((out / prep.STATE).read_text()))  # what the re-run starts with: consistent


CTRL_C_WHILE_WORKERS_START = """
import sys, time
from axiom.data.workers import results_in_order
print("starting", flush=True)
try:
    for _ in results_in_order([0.5] * 8, 2, time.sleep, ()):
        pass
except KeyboardInterrupt:
    sys.exit("interrupted")
"""


def test_ctrl_c_while_prepare_workers_start_is_answered_by_prepare_alone():
    """Ctrl-C reaches the process group: a worker cut while its interpreter started printed a KeyboardInterrupt
    traceback from Python's own imports (about 1 in 4 Ctrl-Cs in the first 0.4 s). Spread over that window here."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in [0.03 * i for i in range(12)]:
        child = subprocess.Popen(
            [sys.executable, "-c", CTRL_C_WHILE_WORKERS_START], env=env, text=True, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert child.stdout.readline() == "starting\n"
        time.sleep(delay)
        os.killpg(child.pid, signal.SIGINT)  # as a terminal's Ctrl-C: to every process of the group
        _, err = child.communicate(timeout=60)
        assert (child.returncode, err) == (1, "interrupted\n"), f"Ctrl-C after {delay:.2f} s: {err}"


def test_workers_start_where_multiprocessing_has_no_resource_tracker(monkeypatch):
    """Windows has no resource tracker: starting one there, as POSIX needs before SIGINT is held, raised
    ModuleNotFoundError (_posixsubprocess) and no prepare with workers ran. Simulated: os.name 'nt' as the module
    sees it, and the tracker's start failing as it does there."""
    import types

    from axiom.data import workers

    def no_tracker() -> None:
        raise ModuleNotFoundError("No module named '_posixsubprocess'")

    monkeypatch.setattr(workers, "os", types.SimpleNamespace(name="nt"))
    monkeypatch.setattr(workers.resource_tracker, "ensure_running", no_tracker)
    assert list(workers.results_in_order([1, 2, 3, 4], 2, abs, ())) == [1, 2, 3, 4]


STOP_WHILE_SENDING = """
import multiprocessing
from axiom.data.workers import results_in_order
for _ in range(10):
    results = results_in_order([4_000_000] * 8, 2, bytes, ())  # each unit: a result of 4 MB, more than a pipe holds
    assert next(results) == bytes(4_000_000)
    results.close()  # as Ctrl-C, SIGTERM or an error does, while the workers send the next results
    assert not multiprocessing.active_children()
print("stopped 10 times")
"""


def test_stopping_the_workers_while_they_send_results_never_hangs():
    """prepare stopped (SIGTERM, Ctrl-C, a bad unit) while its workers send results: multiprocessing.Pool's
    terminate() waited forever for a lock held by a worker blocked on a pipe that no one read any more (cpython#96995;
    about 1 stop in 3 to 10 on a loaded 2-core VM, and once in test_sigterm_stops_prepare_with_workers_cleanly)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", STOP_WHILE_SENDING], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout == "stopped 10 times\n", done.stderr
