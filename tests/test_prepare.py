"""`axiom prepare` on small corpora written here: token stream, split, worker-count independence, restart, errors."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from axiom.cli import main
from axiom.data import prepare as prep
from axiom.data import sources
from axiom.data.loader import TrainLoader, eval_batches, read_manifest
from axiom.errors import AxiomError
from axiom.text.tokenizer import EOS_ID, load_tokenizer

PARQUET_DOCS = ["The first document.", "", "Second one, a bit longer than the first.", None, "dup text", "Row six."]
JSONL_DOCS = ["héllo wörld 🌍 from jsonl", "dup text", "Line three\nhas a newline.", "", "dup text"]
GZ_DOCS = ["gzip doc one", "gzip doc two is here"]
ZST_DOCS = ["zstd doc", "another zstd doc with numbers 12345"]
TXT_DOCS = {"e.txt": "A whole text file.\nWith two lines.\n", "f.txt": "Ünïcode text file"}
# Files are read in sorted order: a.parquet, b.jsonl, c.jsonl.gz, d.jsonl.zst, e.txt, f.txt
ALL_DOCS = PARQUET_DOCS + JSONL_DOCS + GZ_DOCS + ZST_DOCS + list(TXT_DOCS.values())


def jsonl_bytes(docs, extra_field=True):
    lines = [json.dumps({"id": i, "text": t} if extra_field else {"text": t}) for i, t in enumerate(docs)]
    lines.insert(2, "")  # blank lines are allowed and skipped
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    table = pa.table({"id": list(range(len(PARQUET_DOCS))), "text": PARQUET_DOCS})
    pq.write_table(table, d / "a.parquet", row_group_size=3)
    (d / "b.jsonl").write_bytes(jsonl_bytes(JSONL_DOCS))
    (d / "c.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(GZ_DOCS)))
    zst = zstandard.ZstdCompressor()  # two frames, as parallel compressors write
    (d / "d.jsonl.zst").write_bytes(zst.compress(jsonl_bytes(ZST_DOCS[:1])) + zst.compress(jsonl_bytes(ZST_DOCS[1:])))
    for name, text in TXT_DOCS.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "notes.md").write_text("not a source: ignored")
    return d


def expected_streams(docs, val_fraction, split_seed=1337):
    """The token streams the documented formula gives, built without axiom's code."""
    enc = load_tokenizer()
    streams = {"train": [], "val": []}
    counts = {"train": [0, 0], "val": [0, 0]}  # docs, bytes
    for text in docs:
        if not text:
            continue
        data = text.encode("utf-8")
        h = int.from_bytes(hashlib.blake2b(f"{split_seed}:".encode() + data, digest_size=8).digest(), "big")
        split = "val" if h / 2**64 < val_fraction else "train"
        streams[split] += [*enc.encode_ordinary(text), EOS_ID]
        counts[split][0] += 1
        counts[split][1] += len(data)
    return streams, counts


def read_split(out, split):
    m = read_manifest(out)
    parts = [np.fromfile(out / s["file"], dtype="<u4") for s in m["shards"] if s["split"] == split]
    return np.concatenate(parts).tolist() if parts else []


def run_cli(capsys, *argv):
    code = main(["prepare", *map(str, argv)])
    return code, capsys.readouterr().err.strip().splitlines()[-1:] or [""]


def test_tokens_split_and_manifest_match_tiktoken(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 40)  # several byte-range units in one jsonl file
    monkeypatch.setattr(sources, "TXT_GROUP_BYTES", 10)  # one unit per .txt file
    out = tmp_path / "out"
    m = prep.prepare([str(corpus)], out, workers=1, val_fraction=0.4, shard_tokens=16)
    streams, counts = expected_streams(ALL_DOCS, 0.4)
    assert counts["val"][0] >= 2 and counts["train"][0] >= 2  # the fixture exercises both splits
    for split in ("train", "val"):
        assert read_split(out, split) == streams[split]
        assert m[f"{split}_tokens"] == len(streams[split])
        assert [m[f"{split}_docs"], m[f"{split}_bytes"]] == counts[split]
        shards = [s for s in m["shards"] if s["split"] == split]
        assert [s["file"] for s in shards] == [f"{split}_{i:05d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 16 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 16
        assert sum(s["docs"] for s in shards) == counts[split][0]
    assert m["skipped_empty_docs"] == 3
    assert m["tokenizer"]["name"] == "cl100k_base" and m["eos_id"] == EOS_ID
    assert m["split"] == {"val_fraction": 0.4, "split_seed": 1337, "formula": sources.SPLIT_FORMULA}
    names = [s["path"].rsplit("/", 1)[1] for s in m["sources"]]
    assert names == ["a.parquet", "b.jsonl", "c.jsonl.gz", "d.jsonl.zst", "e.txt", "f.txt"]
    assert {"size", "mtime"} <= set(m["sources"][0])
    assert not list(out.glob("*.tmp")) and not (out / prep.STATE).exists()
    # the loader reads what prepare wrote
    x, y = TrainLoader(out, seq_len=4, micro_batch_size=2, seed=0).next_batch()
    assert x.shape == (2, 4) and y.shape == (2, 4)
    (vx, _), *_ = eval_batches(out, seq_len=4, batch_size=1, eval_tokens=4)
    assert vx.flatten().tolist() == streams["val"][:4]


def test_output_is_byte_identical_for_any_worker_count(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 40)
    m1 = prep.prepare([str(corpus)], tmp_path / "w1", workers=1, val_fraction=0.3, shard_tokens=10)
    m2 = prep.prepare([str(corpus)], tmp_path / "w2", workers=2, val_fraction=0.3, shard_tokens=10)
    assert m1 == m2
    files = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "w2").iterdir()) and len(files) > 4
    for name in files:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name
    # a second run with the same settings does nothing and returns the manifest
    assert prep.prepare([str(corpus)], tmp_path / "w1", workers=1, val_fraction=0.3, shard_tokens=10) == m1


@pytest.mark.parametrize("planted", ["../victim.txt", "/victim.txt", "notes.txt", "train_00000.bin.tmp", 7])
def test_a_state_naming_files_that_are_not_shards_deletes_nothing(corpus, tmp_path, monkeypatch, planted):
    """Restoring a state deletes the files it lists as created: a state that named ../victim.txt deleted it."""
    kwargs = dict(workers=1, val_fraction=0.3, shard_tokens=10)
    out = tmp_path / "out"
    real_write = prep.write_json_atomic

    def interrupting_write(path, obj):
        real_write(path, obj)
        if obj.get("units_done") == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_json_atomic", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([str(corpus)], out, **kwargs)
    monkeypatch.setattr(prep, "write_json_atomic", real_write)
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (out / "notes.txt").write_text("mine")
    state = json.loads((out / prep.STATE).read_text())
    name = str(victim) if planted == "/victim.txt" else planted
    real_write(out / prep.STATE, {**state, "created": [*state["created"], name]})
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(AxiomError, match=f"{prep.STATE}: {name!r} is not a shard's name"):
        prep.prepare([str(corpus)], out, **kwargs)
    assert victim.read_text() == "mine" and sorted(p.name for p in out.iterdir()) == before


def test_a_dictionary_encoded_text_column_is_read_as_its_strings(tmp_path):
    """pandas writes a category column dictionary-encoded: it was refused as not string text."""
    docs = ["the same line", "another line", "the same line", None, "a third"]
    plain, coded = tmp_path / "plain", tmp_path / "coded"
    plain.mkdir(), coded.mkdir()
    pq.write_table(pa.table({"text": docs}), plain / "a.parquet")
    pq.write_table(pa.table({"text": pa.array(docs).dictionary_encode()}), coded / "a.parquet")
    assert pq.read_schema(coded / "a.parquet").field("text").type == pa.dictionary(pa.int32(), pa.string())
    m1 = prep.prepare([str(plain)], tmp_path / "o1", workers=1, val_fraction=0.0, allow_empty_split=True)
    m2 = prep.prepare([str(coded)], tmp_path / "o2", workers=1, val_fraction=0.0, allow_empty_split=True)
    assert m1["train_docs"] == m2["train_docs"] == 4
    assert read_split(tmp_path / "o1", "train") == read_split(tmp_path / "o2", "train")


def test_split_fraction_and_duplicates(tmp_path):
    rng = np.random.default_rng(0)
    docs = [f"doc {i} {rng.integers(1 << 30)}" for i in range(2000)] + ["same text"] * 50
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    m = prep.prepare([str(tmp_path / "c.jsonl")], tmp_path / "o", workers=1, val_fraction=0.1)
    assert m["train_docs"] + m["val_docs"] == 2050
    assert 150 <= m["val_docs"] <= 300  # ~10% of 2000, plus 0 or 50 duplicates
    same = load_tokenizer().encode_ordinary("same text")
    hits = {s: read_split(tmp_path / "o", s) for s in ("train", "val")}
    in_split = {s: sum(1 for i in range(len(v)) if v[i : i + len(same)] == same) for s, v in hits.items()}
    assert sorted(in_split.values()) == [0, 50]  # every copy of a text lands in the same split


def test_restart_after_interruption_redoes_only_missing_work(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "JSONL_CHUNK_BYTES", 40)
    kwargs = dict(workers=1, val_fraction=0.3, shard_tokens=10)
    ref = prep.prepare([str(corpus)], tmp_path / "ref", **kwargs)
    units = len(sources.plan_units(sources.resolve_inputs([str(corpus)]), "text"))

    out = tmp_path / "out"
    real_write = prep.write_json_atomic

    def interrupting_write(path, obj):
        real_write(path, obj)
        if obj.get("units_done") == 4:  # Ctrl-C after the 4th unit was recorded
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_json_atomic", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([str(corpus)], out, **kwargs)
    monkeypatch.setattr(prep, "write_json_atomic", real_write)
    assert not (out / "manifest.json").exists()
    state = json.loads((out / prep.STATE).read_text())
    assert state["units_done"] == 4
    # kill -9 while the next unit was being written: tokens past the recorded length, and a next shard that was
    # claimed (listed in the state's "created") and begun
    train = state["splits"]["train"]
    assert train["partial_tokens"] > 0
    partial = out / f"train_{len(train['shards']):05d}.bin.tmp"
    with open(partial, "ab") as f:
        f.write(b"\x01\x00\x00\x00" * 3)
    following = f"train_{len(train['shards']) + 1:05d}.bin"
    real_write(out / prep.STATE, {**state, "created": [*state["created"], following]})
    (out / (following + ".tmp")).write_bytes(b"\0" * 40)

    calls = []
    real_tokenize = sources.tokenize_unit
    monkeypatch.setattr(sources, "tokenize_unit", lambda *a: calls.append(a[0]) or real_tokenize(*a))
    assert prep.prepare([str(corpus)], out, **kwargs) == ref
    assert len(calls) == units - 4
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "ref").iterdir())
    for p in out.iterdir():
        assert p.read_bytes() == (tmp_path / "ref" / p.name).read_bytes(), p.name


def test_bad_inputs_fail_in_one_line_without_complete_looking_shards(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(40)))

    def fails(inputs, pattern, *extra):
        code, (line,) = run_cli(capsys, *inputs, "--out", out, "--workers", "1", "--shard-tokens", "100", *extra)
        assert code == 2 and line.startswith("axiom prepare: error: "), line
        assert pattern in line, line
        assert not list(out.glob("*.bin")) and not (out / "manifest.json").exists()
        return line

    fails([tmp_path / "missing.parquet"], "missing.parquet: no such file or directory")
    fails([str(tmp_path / "nothing-*.jsonl")], "nothing-*.jsonl: the pattern matches no")
    (tmp_path / "emptydir").mkdir()
    fails([tmp_path / "emptydir"], "emptydir: no .parquet, .jsonl")
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "nocol.parquet")
    fails([tmp_path / "nocol.parquet"], "nocol.parquet: no column 'text' (columns: content); choose one")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not parquet at all")
    fails([tmp_path / "corrupt.parquet"], "corrupt.parquet: not a readable parquet file")
    (tmp_path / "utf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff byte"}\n')
    fails([good, tmp_path / "utf8.jsonl"], "utf8.jsonl:2: invalid UTF-8")
    (tmp_path / "json.jsonl").write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": "unterminated}\n')
    fails([good, tmp_path / "json.jsonl"], "json.jsonl:3: invalid JSON", "--workers", "2")  # raised in a worker
    assert not (out / prep.STATE).exists() and not list(out.glob("*.tmp"))
    with monkeypatch.context() as mp:  # the bad line is in a later byte range: its number is still right
        mp.setattr(sources, "JSONL_CHUNK_BYTES", 20)
        fails([tmp_path / "json.jsonl"], "json.jsonl:3: invalid JSON")
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    fails([tmp_path / "field.jsonl"], "field.jsonl:1: no field 'text' (found: body)")
    (tmp_path / "utf8.txt").write_bytes(b"line one\nline \xc3\x28 two\n")
    fails([tmp_path / "utf8.txt"], "utf8.txt:2: invalid UTF-8")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    fails([tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"], "no documents in")
    # a manifest from other settings in --out
    assert main(["prepare", str(good), "--out", str(out), "--workers", "1", "--val-fraction", "0.5"]) == 0
    capsys.readouterr()
    code, (line,) = run_cli(capsys, good, "--out", out, "--val-fraction", "0.1")
    assert code == 2 and "manifest.json was made with different settings (split.val_fraction 0.5 -> 0.1)" in line
    (out / "manifest.json").write_text("{truncated")
    code, (line,) = run_cli(capsys, good, "--out", out)
    assert code == 2 and "manifest.json: not valid JSON" in line and f"delete {out}" in line
    code, (line,) = run_cli(capsys, good, "--out", tmp_path / "w0", "--workers", "0")
    assert code == 2 and "need --workers >= 1" in line


def test_hf_source_without_hub_access_fails_in_one_line(tmp_path, capsys, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(**kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, (line,) = run_cli(capsys, "hf:HuggingFaceFW/fineweb-edu:sample/10BT", "--out", tmp_path / "o")
    assert code == 2
    assert "hf:HuggingFaceFW/fineweb-edu:sample/10BT: cannot download from the Hugging Face Hub" in line
    assert "ConnectionError" in line and not (tmp_path / "o").exists()


def test_split_rule_is_the_documented_formula():
    salt = b"7:"
    for text in ["a", "b", "dup", "héllo"]:
        data = text.encode()
        h = int.from_bytes(hashlib.blake2b(salt + data, digest_size=8).digest(), "big") / 2**64
        assert sources.is_val(data, salt, 0.5) == (h < 0.5)
        assert sources.is_val(data, salt, 1.0) and not sources.is_val(data, salt, 0.0)
    with pytest.raises(AxiomError, match="val-fraction"):
        prep.prepare(["x"], "y", val_fraction=1.5)


def test_a_parquet_units_size_is_its_text_columns_after_nested_columns(tmp_path):
    """The progress bar's size of a row group is its text column's bytes, also after a nested column (whose leaves
    come first in the file: the arrow field's index named another leaf)."""
    table = pa.table({"meta": [{"a": 1, "b": "x" * 100}] * 50, "text": ["hello world " * 10] * 50})
    pq.write_table(table, tmp_path / "a.parquet")
    group = pq.ParquetFile(tmp_path / "a.parquet").metadata.row_group(0)
    text = next(group.column(i) for i in range(group.num_columns) if group.column(i).path_in_schema == "text")
    (unit,) = sources.plan_units([tmp_path / "a.parquet"], "text")
    assert unit.est_bytes == text.total_uncompressed_size
