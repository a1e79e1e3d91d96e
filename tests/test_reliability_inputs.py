"""Bad inputs are refused in one line: compressed files, prepared directories, manifests and indexes, values.

One test per fault class of issue 9 (docs/reliability.md lists them); each asserts the exit status, the one-line
message and that the user's files are unchanged.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil

import numpy as np
import pytest
import torch
import zstandard
from reliability_helpers import copy_run, fails, hashes, jsonl, make_run, succeeds

from axiom.cli import main
from axiom.data import prepare as prep
from axiom.data.loader import MANIFEST, TokenStream, TrainLoader
from axiom.errors import AxiomError
from axiom.runtime import pick_device

DOCS = [f"document {i}: " + " ".join(f"w{(i * 7 + j) % 101}" for j in range(40 + i % 30)) for i in range(400)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("reliability-inputs"))


def zstd_block_ends(frame: bytes) -> list[int]:
    """Offsets just past each block of a single zstd frame (RFC 8878 section 3.1.1), e.g. to cut a file between
    two blocks, which python-zstandard's stream reader accepts as a complete file."""
    fhd, pos = frame[4], 5
    single_segment = fhd >> 5 & 1
    pos += (0 if single_segment else 1) + (0, 1, 2, 4)[fhd & 3] + (single_segment, 2, 4, 8)[fhd >> 6]
    ends = []
    while True:
        header = int.from_bytes(frame[pos : pos + 3], "little")
        pos += 3 + (1 if (header >> 1 & 3) == 1 else header >> 3)
        ends.append(pos)
        if header & 1:
            return ends


def test_compressed_inputs_are_verified_complete(tmp_path, capsys):
    rng = random.Random(0)  # words that compress little, so that each 128 KiB block is large
    texts = [" ".join(f"{rng.getrandbits(24):x}" for _ in range(60)) for _ in range(800)]
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    frame = zstandard.ZstdCompressor(level=1).compress(data)
    ends = zstd_block_ends(frame)
    assert len(ends) >= 3 and ends[-1] == len(frame) and ends[1] - ends[0] > 10_000
    gz = gzip.compress(data)
    flipped = bytearray(gz)
    flipped[len(gz) // 2] ^= 0x10
    cases = {
        "block-boundary.jsonl.zst": (frame[: ends[1]], "truncated (the file ends inside a zstd frame)"),
        "mid-block.jsonl.zst": (frame[: ends[0] + 5000], "truncated (the file ends inside a zstd frame)"),
        "no-checksum-yet.jsonl.zst": (frame[:-2], "truncated"),
        "not-zstd.jsonl.zst": (data[:4000], "not a valid zstd file"),
        "mid-stream.jsonl.gz": (gz[: len(gz) // 2], "truncated (the gzip stream ends before its end marker)"),
        "no-trailer.jsonl.gz": (gz[:-4], "truncated"),
        "flipped.jsonl.gz": (bytes(flipped), "not a valid gzip file"),
        "plain.jsonl.gz": (data[:4000], "not a valid gzip file (Not a gzipped file"),
        "empty.jsonl.gz": (b"", "truncated (empty: a compressed file holds at least a header)"),  # read as no docs
        "empty.jsonl.zst": (b"", "truncated (empty"),
    }
    good = jsonl(tmp_path / "good.jsonl", DOCS[:50])
    for i, (name, (content, message)) in enumerate(cases.items()):
        (tmp_path / name).write_bytes(content)
        out = tmp_path / f"out{i}"
        workers = "2" if name == "block-boundary.jsonl.zst" else "1"  # raised in a worker process
        argv = ["prepare", good, tmp_path / name, "--out", out, "--workers", workers]
        fails(capsys, argv, name, message, "; download or compress it again (nothing was written)")
        assert not out.exists()  # nothing left behind: no shards, no state, no folder
    # complete files, one of them several frames, are read in full
    two = zstandard.ZstdCompressor(write_checksum=True)
    (tmp_path / "ok.jsonl.zst").write_bytes(two.compress(data[: len(data) // 2]) + two.compress(data[len(data) // 2 :]))
    (tmp_path / "ok.jsonl.gz").write_bytes(gz)
    m = prep.prepare([str(tmp_path / "ok.jsonl.zst"), str(tmp_path / "ok.jsonl.gz")], tmp_path / "ok", workers=1)
    assert m["train_docs"] + m["val_docs"] == 2 * len(texts)


def test_files_prepare_did_not_write_are_never_deleted(tmp_path, capsys, monkeypatch):
    corpus = jsonl(tmp_path / "c.jsonl", DOCS[:80])
    args = ["--workers", "1", "--val-fraction", "0.2", "--shard-tokens", "500"]
    out = tmp_path / "out"
    out.mkdir()
    for name in ("train_00000.bin", "val_00007.bin", "train_00003.bin.tmp"):
        (out / name).write_bytes(b"user data " + name.encode())
        before = hashes(out)
        fails(capsys, ["prepare", corpus, "--out", out, *args], f"{name}: a file with a shard's name", "left alone")
        assert hashes(out) == before
        (out / name).rename(tmp_path / name)
    # other files in a folder that is not prepare's own output: refused, left as they are
    (out / "README.md").write_text("my notes")
    fails(capsys, ["prepare", corpus, "--out", out, *args], "holds README.md, which axiom prepare did not write")
    assert sorted(p.name for p in out.iterdir()) == ["README.md"]
    (out / "README.md").unlink()
    # bad input: everything prepare wrote is removed, the folder it was given stays
    jsonl(tmp_path / "bad.jsonl", ["fine"] * 30).open("a").write("{broken\n")
    fails(capsys, ["prepare", corpus, tmp_path / "bad.jsonl", "--out", out, *args], "bad.jsonl:31: invalid JSON")
    assert out.is_dir() and not list(out.iterdir())
    # an interrupted run, then a foreign shard-named file appears: still refused
    real_save = prep.Ledger.save

    def interrupted(self):
        real_save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep.Ledger, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([str(corpus)], out, workers=1, val_fraction=0.2, shard_tokens=500)
    monkeypatch.setattr(prep.Ledger, "save", real_save)
    (out / "README.md").write_text("my notes")  # in prepare's own output: its other files are left as they are
    (out / "val_00009.bin").write_bytes(b"mine")
    fails(capsys, ["prepare", corpus, "--out", out, *args], "val_00009.bin", f"not listed in {out / prep.STATE}")
    (out / "val_00009.bin").unlink()
    succeeds(capsys, ["prepare", corpus, "--out", out, *args])
    assert (out / "README.md").read_text() == "my notes"


def test_prepare_writes_only_into_a_new_or_empty_folder_or_its_own_output(run, tmp_path, capsys):
    corpus = jsonl(tmp_path / "c.jsonl", DOCS[:40])
    args = ["--workers", "1", "--val-fraction", "0.2"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "README.md").write_text("my notes")
    mixed = tmp_path / "mixed"  # a shard-named file does not make a folder prepare's own
    mixed.mkdir()
    for name in ("train_00000.bin", "a.txt", "b.txt", "c.txt", "d.txt"):
        (mixed / name).write_text("mine")
    cases = {
        copy_run(run, tmp_path / "run"): "holds checkpoints, eval.csv, train.log, which axiom prepare did not write",
        copy_run(run / "checkpoints" / "best", tmp_path / "ckpt"): "holds checksums.json, config.json, model.safet",
        notes: "holds README.md, which",
        mixed: "holds a.txt, b.txt, c.txt and 1 more, which",
    }
    for out, message in cases.items():
        before = hashes(out), sorted(out.rglob("*"))
        fails(capsys, ["prepare", corpus, "--out", out, *args], f"--out {out} {message}", "choose another --out")
        assert (hashes(out), sorted(out.rglob("*"))) == before  # nothing written, nothing removed
        assert not (tmp_path / f".{out.name}.lock").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    succeeds(capsys, ["prepare", corpus, "--out", empty, *args])
    assert "already prepared with these settings: nothing to do" in succeeds(
        capsys, ["prepare", corpus, "--out", empty, *args]
    )


def test_damaged_prepared_data_is_reported_with_the_fix(run, tmp_path, capsys, monkeypatch):
    corpus = jsonl(tmp_path / "c.jsonl", DOCS[:80])
    out = tmp_path / "data"
    args = ["--workers", "1", "--val-fraction", "0.3", "--shard-tokens", "500"]
    succeeds(capsys, ["prepare", corpus, "--out", out, *args])
    best = run / "checkpoints" / "best"
    fix = f"delete {out} and run"
    for shard in (out / "train_00001.bin", out / "val_00000.bin"):
        good = shard.read_bytes()
        for damaged in (good[:-8], good + bytes(8)):  # a full disk or a partial copy; bytes appended
            shard.write_bytes(damaged)
            found = f"{shard}: {len(damaged):,} bytes, but {out / MANIFEST} records {len(good):,} bytes"
            fails(capsys, ["prepare", corpus, "--out", out, *args], found, "damaged", fix)  # not "nothing to do"
        shard.write_bytes(good)
    shard.write_bytes(good[:-8])
    fails(capsys, ["eval", "--ckpt", best, "--data", out, "--device", "cpu"], "val_00000.bin", fix)
    # a new run refused for its val split leaves no folder behind (it was found at the first evaluation, after the
    # run's files were written, and the corrected command was then refused: "already holds a run")
    new_run = tmp_path / "new-run"
    fails(capsys, ["train", "--preset", "tiny", "--data", out, "--out", new_run, "--device", "cpu"], "val_00000.bin")
    assert not new_run.exists()
    shard.write_bytes(good)
    # ids the model cannot embed: the message says which vocabulary is wrong
    fails(capsys, ["eval", "--ckpt", best, "--data", out], "val_00000.bin: token id", "the model's vocab_size is 512")
    # same-size garbage: caught where it is read, naming the shard (not an IndexError deep in the model)
    shard = out / "train_00001.bin"
    garbage = np.fromfile(shard, dtype="<u4")
    garbage[250] = 0xDEADBEEF
    garbage.tofile(shard)
    with pytest.raises(AxiomError, match="train_00001.bin: token id 3,735,928,559 at token 250; not a cl100k_base id"):
        TrainLoader(out, seq_len=16, micro_batch_size=4, seed=0)  # the first tokens of each shard, when opened
    monkeypatch.setattr(TokenStream, "HEAD_CHECK", 0)
    stream = TokenStream(out, "train")
    with pytest.raises(AxiomError, match="train_00001.bin: token id 3,735,928,559 at token 250"):
        stream.read(0, stream.num_tokens)  # and every range read


def write_manifest(src, dest, **changes):
    import shutil

    shutil.copytree(src, dest)
    m = json.loads((dest / MANIFEST).read_text())
    for key, value in changes.items():
        if key == "shard0":
            m["shards"][0] = value
        else:
            m[key] = value
    (dest / MANIFEST).write_text(json.dumps(m))
    return dest


def test_bad_manifests_and_paths_outside_their_folder_are_refused(run, tiny_data, tmp_path, capsys):
    best = run / "checkpoints" / "best"
    shard = json.loads((tiny_data / MANIFEST).read_text())["shards"][0]
    cases = {
        "wrong-type": ({"train_tokens": "16152"}, "train_tokens is '16152', expected a count"),
        "no-file": ({"shard0": {k: v for k, v in shard.items() if k != "file"}}, "shards[0] has no 'file'"),
        "escape": ({"shard0": {**shard, "file": "../../../../etc/passwd"}}, "points outside"),
        "absolute": ({"shard0": {**shard, "file": "/etc/passwd"}}, "points outside"),
        "not-a-name": ({"shard0": {**shard, "file": 7}}, "7 is not a file name"),
        "split": ({"shard0": {**shard, "split": "test"}}, "shards[0].split is 'test'"),
        "tokens": ({"shard0": {**shard, "tokens": -1}}, "tokens is -1"),
        "totals": ({"train_tokens": 5}, "the train shards hold 16,152 tokens but train_tokens is 5"),
        "eos": ({"eos_id": 0}, "eos_id 0, but cl100k_base's end-of-text id is 100257"),
        "tokenizer": ({"tokenizer": {"name": "gpt2"}}, "is not this code's cl100k_base"),
        "shards": ({"shards": {"a": 1}}, "shards is dict, expected a list"),
        "split-object": ({"split": "x"}, "split is 'x', expected an object"),  # train: an AttributeError traceback
    }
    for name, (changes, message) in cases.items():
        data = write_manifest(tiny_data, tmp_path / name, **changes)
        fails(capsys, ["eval", "--ckpt", best, "--data", data, "--device", "cpu"], str(data), message)
    # a Hugging Face index naming a file outside its folder
    hf = tmp_path / "hf"
    succeeds(capsys, ["export", "--ckpt", best, "--out", hf])
    (hf / "model.safetensors").rename(tmp_path / "weights.safetensors")
    for target in ("../weights.safetensors", str(tmp_path / "weights.safetensors")):
        index = {"metadata": {}, "weight_map": {"embed.weight": target}}
        (hf / "model.safetensors.index.json").write_text(json.dumps(index))
        fails(capsys, ["import", "--hf", hf, "--out", tmp_path / "imp"], "weight_map", "points outside")


@pytest.mark.parametrize(
    "override, message",
    [
        ("beta1=1.5", "beta1=1.5 must be in [0, 1)"),
        ("beta2=-0.1", "beta2=-0.1 must be in [0, 1)"),
        ("warmup_steps=-1", "warmup_steps=-1 must be 0 or more"),
        ("weight_decay=-1", "weight_decay=-1.0 must be 0 or more"),
        ("grad_clip=-1", "grad_clip=-1.0 must be 0 (off)"),
        ("seq_len=1", "seq_len=1 must be at least 2"),
        ("lr_max=nan", "lr_max=nan must be a positive finite number"),
        ("lr_min=1", "lr_min=1.0 must be in [0, lr_max=0.003]"),
        ("seed=-1", "seed=-1 must be in [0, 2**32)"),
        ("eval_tokens=64", "eval_tokens=64 is less than one sequence (seq_len=128)"),
        ("dropout=1", "dropout=1.0 must be in [0, 1)"),
        ("norm_eps=inf", "norm_eps=inf must be a positive finite number"),
        ("decay_fraction=2", "decay_fraction=2.0 must be in [0, 1]"),
        ("micro_batch_size=0", "micro_batch_size=0 must be positive"),
    ],
)
def test_config_values_out_of_range_are_refused(override, message, capsys):
    fails(capsys, ["info", "--preset", "tiny", "--set", override], message)


def test_a_config_json_with_a_wrong_typed_field_names_the_field(run, tmp_path, capsys):
    """A checkpoint's config.json edited by hand or written by another program: the field, not a TypeError."""
    best = run / "checkpoints" / "best"
    meta = json.loads((best / "config.json").read_text())
    for table, field, value, message in [
        ("model", "d_model", "32", "model config: d_model='32' must be of type int"),
        ("train", "lr_max", "fast", "train config: lr_max='fast' must be of type float"),
    ]:
        ckpt = tmp_path / table
        shutil.copytree(best, ckpt)
        (ckpt / "config.json").write_text(json.dumps({**meta, table: {**meta[table], field: value}}))
        (ckpt / "checksums.json").unlink()  # edited after it was written: the hashes would say so first
        config = ckpt / "config.json"
        fails(
            capsys,
            ["generate", "--ckpt", ckpt, "--prompt", "x"],
            f"{config} has no valid model/train config ({message})",
        )


def test_a_warmup_longer_than_the_run_is_reported(capsys):
    assert main(["info", "--preset", "tiny", "--set", "max_steps=5"]) == 0  # a smoke run of a preset: allowed
    note = "notice: warmup_steps=20 is more than the run's 5 steps: the LR only reaches 25% of lr_max"
    assert note in capsys.readouterr().err


def test_command_values_out_of_range_are_refused(run, tiny_data, tmp_path, capsys):
    best = run / "checkpoints" / "best"
    ev = ["eval", "--ckpt", best, "--data", tiny_data]
    fails(capsys, [*ev, "--eval-tokens", "0"], "--eval-tokens 0: must be positive")
    fails(capsys, [*ev, "--eval-tokens", "8"], "--eval-tokens 8: less than one sequence of 32 tokens")
    fails(capsys, [*ev, "--batch-size", "0"], "--batch-size 0: must be positive")
    fails(capsys, [*ev, "--limit", "5"], "--limit 5: applies to --tasks and --task-file only")  # was ignored
    fails(capsys, [*ev[:3], "--tasks", "x", "--eval-tokens", "64"], "--eval-tokens 64: applies to --data only")
    fails(capsys, [*ev, "--device", "tpu"], "--device tpu: unknown device")
    if not torch.cuda.is_available():
        fails(capsys, [*ev, "--device", "cuda"], "--device cuda: no CUDA device is visible")
    fails(capsys, [*ev, "--device", "cuda:99"], "--device cuda:99")
    corpus = jsonl(tmp_path / "c.jsonl", DOCS[:20])
    for fraction, empty in (("0", "val"), ("1", "train")):
        out, args = tmp_path / f"f{fraction}", ["--val-fraction", fraction, "--workers", "1"]
        fails(capsys, ["prepare", corpus, "--out", out, *args], f"leaves the {empty} split empty")
        assert not out.exists()
        succeeds(capsys, ["prepare", corpus, "--out", out, *args, "--allow-empty-split"])


def test_more_processes_than_gpus_are_refused_by_every_process(monkeypatch):
    """torchrun --nproc-per-node 4 on a machine of 2 GPUs: processes 2 and 3 had no GPU and failed alone, and only
    the first process of a machine prints an error, so nothing said why."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for local_rank in range(4):
        with pytest.raises(AxiomError) as e:
            pick_device("cuda", local_rank, 4)
        assert str(e.value) == (
            "--device cuda: torchrun starts 4 processes on this machine, which has 2 CUDA device(s); start at most 2 "
            "(--nproc-per-node 2)"
        )


def test_misleading_inputs_are_named_for_what_they_are(run, tiny_data, tmp_path, capsys):
    fifo = tmp_path / "docs.jsonl"
    os.mkfifo(fifo)
    fails(capsys, ["prepare", fifo, "--out", tmp_path / "o"], "docs.jsonl: is a FIFO; prepare reads regular files")
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    fails(capsys, ["prepare", tmp_path / "gone.jsonl", "--out", tmp_path / "o"], "a broken symbolic link to")
    fails(capsys, ["eval", "--ckpt", fifo, "--data", tiny_data], "is a FIFO, not a checkpoint folder")
    fails(capsys, ["eval", "--ckpt", run / "checkpoints" / "best", "--data", fifo], "is a FIFO, not a prepared data")
    for path, kind in (
        (fifo, "is a FIFO"),
        (tmp_path, "is a directory"),
        (tmp_path / "gone.jsonl", "a broken symbolic"),
    ):
        task_file = ["eval", "--ckpt", run / "checkpoints" / "best", "--task-file", path]
        fails(capsys, task_file, f"--task-file {path}: {kind}", "a task file is a JSONL file")
    # a pattern's matches too (a FIFO among them hung prepare at its first read; the others were tracebacks)
    (matched := tmp_path / "matched").mkdir()
    jsonl(matched / "a.jsonl", DOCS[:5])
    os.mkfifo(matched / "f.jsonl")
    fails(capsys, ["prepare", f"{matched}/*.jsonl", "--out", tmp_path / "o"], "f.jsonl: is a FIFO; prepare reads")
    (matched / "f.jsonl").unlink()
    (matched / "b.jsonl").symlink_to(tmp_path / "nowhere.jsonl")
    fails(capsys, ["prepare", f"{matched}/*.jsonl", "--out", tmp_path / "o"], "b.jsonl: a broken symbolic link")
    assert not (tmp_path / "o").exists()
    (matched / "b.jsonl").unlink()
    (matched / "more.jsonl").mkdir()  # a folder it matches is read as a folder named on the command line is
    jsonl(matched / "more.jsonl" / "c.jsonl", DOCS[5:8])
    manifest = prep.prepare([f"{matched}/*.jsonl"], tmp_path / "o", workers=1, val_fraction=0.5)
    assert manifest["train_docs"] + manifest["val_docs"] == 8
    hf = tmp_path / "hf"
    succeeds(capsys, ["export", "--ckpt", run / "checkpoints" / "best", "--out", hf])
    fails(capsys, ["eval", "--ckpt", hf, "--data", tiny_data], "is a Hugging Face model folder", "axiom import --hf")


def test_wrong_json_types_in_chat_rows_are_one_line_errors(tmp_path, capsys):
    rows = {
        "role-list": ({"messages": [{"role": ["user"], "content": "hi"}]}, "unknown role ['user']"),
        "from-dict": ({"conversations": [{"from": {"a": 1}, "value": "hi"}]}, "unknown from {'a': 1}"),
    }
    for name, (row, message) in rows.items():
        path, out = tmp_path / f"{name}.jsonl", tmp_path / f"out-{name}"
        path.write_text(json.dumps(row) + "\n")
        fails(capsys, ["prepare", "--chat", path, "--out", out, "--workers", "1"], f"{path}:1: message 0: {message}")
        assert not out.exists()


def test_plot_refuses_empty_or_garbage_csv(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    cases = {
        "empty": (b"", "no column tokens, val_loss"),
        "header": (b"step,tokens,train_loss,val_loss\n", "header/eval.csv: no evaluation yet; plot again after"),
        "words": (b"step,tokens,val_loss\n1,abc,2.0\n", "not a csv of numbers"),
        "binary": (os.urandom(64) + b"\xff\xfe", "not a text file"),
        "nan": (
            b"step,tokens,val_loss\n1,10,nan\n2,20,inf\n",
            "of its 2 evaluation(s) is NaN or inf (the run diverged)",
        ),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.csv").write_bytes(content)
        fails(capsys, ["plot", tmp_path / name], message)
        assert not (tmp_path / name / "loss.png").exists()
    (tmp_path / "started").mkdir()  # a run moments old: train.log, no evaluation yet
    (tmp_path / "started" / "train.log").write_text("run started\n")
    fails(capsys, ["plot", tmp_path / "started"], "started: no evaluation yet (eval.csv is written after the first)")
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "eval.csv").write_text(
        "step,tokens,train_loss,val_loss\n0,0,,6.0\n2,256,nan,5.0\n4,512,4.8,nan\n"
    )
    fails(capsys, ["plot", tmp_path / "ok", "--out", tmp_path / "ok" / "loss.weird"], "cannot write .weird files")
    succeeds(capsys, ["plot", tmp_path / "ok"])
    assert (tmp_path / "ok" / "loss.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["eval.csv", "loss.png"]


def test_json_that_python_refuses_and_byte_order_marks(tmp_path, capsys):
    """An integer of 5,000 digits or nesting 100,000 deep is invalid JSON in one line with nothing left behind (they
    were tracebacks that left the output); a UTF-8 byte-order mark starting a .jsonl or .txt file is no part of its
    text (one made a .jsonl file invalid JSON, and a .txt document started with U+FEFF)."""
    good = jsonl(tmp_path / "good.jsonl", DOCS[:20])
    for name, line, message in [
        ("bigint.jsonl", '{"text": "x", "id": ' + "1" * 5000 + "}", "bigint.jsonl:1: invalid JSON (Exceeds the limit"),
        ("nested.jsonl", '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested.jsonl:1: invalid JSON (nested"),
    ]:
        (tmp_path / name).write_text(line + "\n")
        out = tmp_path / f"out-{name}"
        fails(capsys, ["prepare", good, tmp_path / name, "--out", out], message)
        assert not out.exists()
    text = "In the beginning was the word."
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": text}).encode() + b"\n")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "plain.txt").write_text(text)
    args = ["--val-fraction", "0.5", "--allow-empty-split"]
    tokens = {}
    for name in ("bom.jsonl", "bom.txt", "plain.txt"):
        succeeds(capsys, ["prepare", tmp_path / name, "--out", tmp_path / f"p-{name}", *args])
        tokens[name] = sorted(p.read_bytes() for p in (tmp_path / f"p-{name}").glob("*.bin"))
    assert tokens["bom.jsonl"] == tokens["bom.txt"] == tokens["plain.txt"]


def test_a_worker_that_dies_is_one_line_and_the_work_done_is_kept():
    """A worker killed mid-unit (kill -9, the out-of-memory killer): a multiprocessing.Pool lost its unit and waited
    for it forever. Here each unit's work is os._exit, so the first worker to take one dies."""
    from axiom.data.workers import WorkerDied, results_in_order

    with pytest.raises(WorkerDied, match="a worker process ended without finishing its unit .* run the same command"):
        list(results_in_order([3, 3, 3], 2, os._exit, ()))


def test_a_state_file_left_beside_a_finished_manifest_is_removed(tmp_path, capsys):
    """A kill between the manifest's rename and the state file's removal leaves both; the next run of the same
    command finds the directory prepared and takes the state file away."""
    good, out = jsonl(tmp_path / "good.jsonl", DOCS[:20]), tmp_path / "out"
    succeeds(capsys, ["prepare", good, "--out", out])
    (out / "prepare-state.json").write_text("{}")
    succeeds(capsys, ["prepare", good, "--out", out])
    assert not (out / "prepare-state.json").exists() and (out / "manifest.json").is_file()


def test_settings_that_would_be_ignored_or_crash_are_one_line(run, tiny_data, tmp_path, capsys):
    """Each was a traceback, a setting accepted and then not used, or a plan that did not say it cannot fit."""
    from conftest import micro_args

    from axiom.config import get_config

    toml = tmp_path / "p.toml"
    toml.write_text('preset = ["tiny"]\n')
    fails(capsys, ["info", "--config", toml], "preset = ['tiny']: unknown preset")  # TypeError: unhashable
    fails(capsys, ["info", "--config", ""], "--config .: a directory")  # "" was read as no file at all
    fails(capsys, ["info", "--preset", "tiny", "--set", "seq_len=4096"], "seq_len=4096 exceeds the model's")
    best = run / "checkpoints" / "best"
    brings = "--preset, --config and --set choose the random model of a run without --ckpt; a checkpoint brings its"
    for chosen in (["--set", "nonsense=1"], ["--preset", "tiny"], ["--config", best / "config.json"]):
        fails(capsys, ["generate", "--ckpt", best, *chosen], brings, "own config: leave them out")
    # a plan that cannot fit says so (4 GiB for the card)
    out = succeeds(capsys, ["info", "--preset", "axiom-380m", "--gpu-memory-gib", "4"])
    assert "more than fits: expect the run to run out of memory" in out
    plan = json.loads(succeeds(capsys, ["info", "--preset", "axiom-380m", "--gpu-memory-gib", "4", "--json"]))
    assert plan["plan"]["fits"] is False
    # --set of a large integer is exact, as in a TOML file
    assert get_config("tiny", ["target_tokens=9007199254740993"]).train.target_tokens == 9007199254740993
    # the split is prepare's: a different one set for training is refused
    data = tmp_path / "data"
    succeeds(capsys, ["prepare", jsonl(tmp_path / "d.jsonl", DOCS[:200]), "--out", data, "--val-fraction", "0.05"])
    train = ["train", "--data", data, *micro_args("max_steps=1", "vocab_size=100277")]
    fails(capsys, [*train, "--out", tmp_path / "r", "--set", "val_fraction=0.5"], "split with val_fraction=0.05")
    fails(capsys, [*train, "--out", tmp_path / "r", "--set", "split_seed=7"], f"{data} was split with split_seed=1337")
    assert not (tmp_path / "r").exists()
    # a config file's split (an earlier run's record) is not refused: the run records its data's, and says so
    (old_run := tmp_path / "old.toml").write_text("[train]\nval_fraction = 0.5\nsplit_seed = 7\n")
    succeeds(capsys, [*train, "--out", tmp_path / "r", "--config", old_run])
    recorded = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert (recorded["val_fraction"], recorded["split_seed"]) == (0.05, 1337)
    note = "data split: val_fraction 0.05, split_seed 1337, as axiom prepare split the data (recorded in config.json in"
    assert f"{note} place of the config's val_fraction 0.5, split_seed 7," in (tmp_path / "r" / "train.log").read_text()
    # plot into a folder that does not exist, or a name ending in a slash
    fails(capsys, ["plot", run, "--out", tmp_path / "nodir" / "x.png"], "nodir: no such file or directory")
    fails(capsys, ["plot", run, "--out", f"{tmp_path}/outdir/"], "names a folder; pass the PNG file")
    # the notices of --set reach runs from --init-from (and --resume) too
    args = ["train", "--data", tiny_data, "--out", tmp_path / "from-best", "--init-from", best]
    code = main([str(a) for a in [*args, *micro_args("max_steps=1", "warmup_steps=5", "eval_interval=1")]])
    assert code == 0 and "notice: warmup_steps=5 is more than the run's 1 steps" in capsys.readouterr().err


def test_scripts_and_flags_refuse_what_they_would_crash_on_or_ignore(tmp_path, capsys):
    """prepare's chat-only flags without --chat; the scripts' counts below 1, an unknown preset and gpu_check's
    --budget nan: one line each (the scripts' were tracebacks; --budget nan ran every part to its own limit)."""
    import subprocess
    import sys

    from reliability_helpers import REPO

    fails(
        capsys,
        ["prepare", jsonl(tmp_path / "d.jsonl", DOCS[:5]), "--out", tmp_path / "o", "--seq-len", "64"],
        "--seq-len and --overflow shape conversations: they go with --chat",
    )
    fails(
        capsys,
        ["prepare", tmp_path / "d.jsonl", "--out", tmp_path / "o", "--overflow", "skip"],
        "--seq-len and --overflow shape conversations: they go with --chat",
    )
    assert not (tmp_path / "o").exists()
    for script, args, message in [
        ("prefill_products.py", ["--rounds", "0"], "--rounds must be at least 1"),
        ("ttft.py", ["--preset", "nope"], "argument --preset: invalid choice: 'nope'"),
        # a rate after the second token needs a third; no round times nothing
        (
            "ttft.py",
            ["--new-tokens", "1"],
            "ttft.py: error: --prompt-len must be at least 1 and --new-tokens at least 3\n",
        ),
        (
            "bench_tasks.py",
            ["--task-file", "x", "--rounds", "0"],
            "bench_tasks.py: error: --rounds must be at least 1\n",
        ),
        ("gpu_check.py", [str(tmp_path / "gc"), "--budget", "nan"], "--budget nan: a number of seconds above 0"),
    ]:
        done = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_hostile_configs_are_one_line_before_anything_is_allocated(run, tmp_path, capsys):
    """A checkpoint from elsewhere asking for sizes no model has (max_seq_len 10**9 filled the memory with RoPE
    tables, 10**6 layers took minutes to build, a d_model of 4,000 digits was an OverflowError), or JSON and TOML
    past Python's limits (RecursionError, ValueError tracebacks); a FIFO where a JSON file belongs blocked forever."""
    best = run / "checkpoints" / "best"
    meta = json.loads((best / "config.json").read_text())
    for field, value, message in [
        ("max_seq_len", 10**9, "max_seq_len=1000000000 is more than 2,097,152"),
        ("n_layers", 10**6, "n_layers=1000000 is more than 1,024"),
        ("d_model", 10**4000, "d_model=<an integer of 4,001 digits> is more than 65,536"),
        ("ffn_multiplier", 1e300, "ffn_multiplier=1e+300 x d_model=32 is more than 1,048,576"),
    ]:
        ckpt = tmp_path / f"ckpt-{field}"
        shutil.copytree(best, ckpt)
        (ckpt / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], field: value}}))
        (ckpt / "checksums.json").unlink(missing_ok=True)
        fails(capsys, ["generate", "--ckpt", ckpt, "--prompt", "x"], f"{ckpt / 'config.json'}", message)
    (tmp_path / "deep.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    (tmp_path / "big.toml").write_text("[model]\nd_model = " + "9" * 5000 + "\n")
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    fails(capsys, ["info", "--config", tmp_path / "deep.json"], "deep.json: not valid JSON (RecursionError")
    fails(capsys, ["info", "--config", tmp_path / "big.toml"], "big.toml: not valid TOML (ValueError: Exceeds the")
    fails(capsys, ["info", "--config", tmp_path / "deep.toml"], "deep.toml: not valid TOML (RecursionError")
    (tmp_path / "deep.jsonl").write_text('{"context": ' * 100_000 + "1" + "}" * 100_000 + "\n")
    fails(capsys, ["eval", "--ckpt", best, "--task-file", tmp_path / "deep.jsonl"], "deep.jsonl:1: not valid JSON")
    fifo = tmp_path / "fifo-ckpt"
    shutil.copytree(best, fifo)
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    fails(capsys, ["generate", "--ckpt", fifo, "--prompt", "x"], f"{fifo / 'config.json'}", "FIFO")


def test_a_shard_that_is_no_regular_file_is_named_for_what_it_is(run, tiny_data, tmp_path, capsys):
    """A FIFO (or a broken link) in a shard's place was reported as "missing"."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = next(data.glob("val_*.bin"))
    shard.unlink()
    os.mkfifo(shard)
    best = run / "checkpoints" / "best"
    fails(capsys, ["eval", "--ckpt", best, "--data", data], f"{shard}: is a FIFO, manifest says")


def test_every_checkpoint_flag_given_a_runs_folder_names_its_checkpoints(run, tmp_path, capsys):
    """A run's folder where a checkpoint belongs (its config.json is the run's, and its weights are in
    checkpoints/): every command says which to pass, before anything is written."""
    line = (
        f"checkpoint: {run} is a run's folder, not a checkpoint; pass one of its checkpoints: {run}/checkpoints/best "
        f"(the lowest val loss) or {run}/checkpoints/step_N"
    )
    before = hashes(run)
    (task := tmp_path / "t.jsonl").write_text('{"context": "a", "choices": ["b", "c"], "answer": 0}\n')
    for argv in [
        ["generate", "--ckpt", run, "--prompt", "x"],
        ["chat", "--ckpt", run, "--message", "hi"],
        ["eval", "--ckpt", run, "--task-file", task],
        ["export", "--ckpt", run, "--out", tmp_path / "hf"],
        ["serve", "--ckpt", run, "--port", "0"],
    ]:
        assert fails(capsys, argv) == f"axiom {argv[0]}: error: {line}"
    assert hashes(run) == before and not (tmp_path / "hf").exists()
