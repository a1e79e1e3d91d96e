"""The shard format and loaders: manifest checks, window order, epochs, exact resume, rank disjointness, eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import fails_holding_nothing, held_under, write_dataset

from axiom.data.loader import TokenStream, TrainLoader, eval_batches, read_manifest
from axiom.errors import AxiomError
from axiom.text.tokenizer import EOS_ID, load_tokenizer

SEQ = 8


@pytest.fixture
def data_dir(tmp_path):
    """Docs of distinct token ids so every position of the stream is recognisable; small shards cross windows."""
    rng = np.random.default_rng(0)
    train, val, nxt = [], [], 0
    for _ in range(40):
        n = int(rng.integers(1, 12))
        train.append(list(range(nxt, nxt + n)))
        nxt += n
    for _ in range(10):
        n = int(rng.integers(1, 12))
        val.append(list(range(nxt, nxt + n)))
        nxt += n
    write_dataset(tmp_path, train, val, shard_tokens=37)
    return tmp_path


def stream_of(data_dir, split):
    m = read_manifest(data_dir)
    return np.concatenate(
        [np.fromfile(data_dir / s["file"], dtype="<u4") for s in m["shards"] if s["split"] == split]
    ).astype(np.int64)


def test_write_dataset_format(data_dir):
    m = read_manifest(data_dir)
    train = stream_of(data_dir, "train")
    assert len(train) == m["train_tokens"] and m["train_docs"] == 40 and m["val_docs"] == 10
    assert (train == EOS_ID).sum() == 40 and train[-1] == EOS_ID
    assert [s["file"] for s in m["shards"]][:2] == ["train_00000.bin", "train_00001.bin"]
    assert all(s["tokens"] <= 37 for s in m["shards"])
    assert sum(s["docs"] for s in m["shards"] if s["split"] == "val") == 10
    # bytes are the documents' UTF-8 bytes: what bits-per-byte divides by
    text_docs = ["héllo world", "a"]
    m2 = write_dataset(data_dir / "t", text_docs, ["val doc"])
    assert m2["train_bytes"] == len("héllo world".encode()) + 1 and m2["val_bytes"] == 7
    tokens = stream_of(data_dir / "t", "train").tolist()
    enc = load_tokenizer()
    assert tokens == [*enc.encode_ordinary("héllo world"), EOS_ID, *enc.encode_ordinary("a"), EOS_ID]


def test_token_stream_reads_across_shards(data_dir):
    train = stream_of(data_dir, "train")
    ts = TokenStream(data_dir, "train")
    assert ts.num_tokens == len(train)
    for start, n in [(0, 5), (30, 20), (36, 2), (0, len(train)), (len(train) - 3, 3)]:
        np.testing.assert_array_equal(ts.read(start, n), train[start : start + n])
    with pytest.raises(IndexError):
        ts.read(len(train) - 1, 2)


def test_windows_cover_each_token_once_per_epoch(data_dir):
    train = stream_of(data_dir, "train")
    loader = TrainLoader(data_dir, SEQ, micro_batch_size=2, seed=1)
    n_win = (len(train) - 1) // SEQ
    per_epoch = n_win // 2
    seen = []
    for _ in range(per_epoch):
        x, y = loader.next_batch()
        assert x.shape == (2, SEQ) and x.dtype == torch.int64 and y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            # windows start at multiples of SEQ; the ids make each window unique
            start = next(s for s in range(0, n_win * SEQ, SEQ) if np.array_equal(train[s : s + SEQ], row_x))
            np.testing.assert_array_equal(row_x, train[start : start + SEQ])
            np.testing.assert_array_equal(row_y, train[start + 1 : start + SEQ + 1])
            seen.append(start // SEQ)
    assert len(set(seen)) == len(seen) == per_epoch * 2  # no window twice in an epoch
    assert loader.state_dict()["epoch"] == 0
    loader.next_batch()
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 2


def test_order_fixed_by_seed_and_differs_across_epochs(data_dir):
    def first_rows(seed, n=12):
        loader = TrainLoader(data_dir, SEQ, micro_batch_size=3, seed=seed)
        return [loader.next_batch()[0] for _ in range(n)]

    a, b, c = first_rows(5), first_rows(5), first_rows(6)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    loader = TrainLoader(data_dir, SEQ, micro_batch_size=1, seed=5)
    n = loader.epoch_windows()
    epoch0 = [loader.next_batch()[0] for _ in range(n)]
    epoch1 = [loader.next_batch()[0] for _ in range(n)]
    assert not all(torch.equal(p, q) for p, q in zip(epoch0, epoch1, strict=True))
    key = lambda t: t.flatten().tolist()  # noqa: E731
    assert sorted(map(key, epoch0)) == sorted(map(key, epoch1))  # same windows, new order


def test_resume_gives_exactly_the_next_batches(data_dir):
    ref = TrainLoader(data_dir, SEQ, micro_batch_size=2, seed=3)
    for _ in range(7):
        ref.next_batch()
    state = json.loads(json.dumps(ref.state_dict()))  # stored in a checkpoint as JSON
    expected = [ref.next_batch() for _ in range(20)]  # crosses into later epochs
    resumed = TrainLoader(data_dir, SEQ, micro_batch_size=2, seed=3)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip((resumed.next_batch() for _ in range(20)), expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(AxiomError, match="seq_len=8"):
        TrainLoader(data_dir, SEQ + 1, micro_batch_size=2, seed=3).load_state_dict(state)


def test_every_split_of_a_step_reads_the_same_windows_across_epochs(data_dir):
    """An epoch ends on a step's boundary: micro-batch 6 x 1, 3 x 2, 2 x 3 and 3 ranks x 2 read the same windows in
    every step, also after the epoch's leftover windows (fewer than a step) are passed over, and so does a run
    resumed at another split (after an out-of-memory back-off halved the micro-batch). An epoch ended where one
    micro-batch no longer fitted: after the first epoch the splits read different windows."""
    step = 6
    n = TrainLoader(data_dir, SEQ, micro_batch_size=1, seed=4).epoch_windows()
    assert n % step, "the data must leave a partial step at the end of an epoch"
    count = 3 * n // step + 2  # three epochs and more

    def loaders(micro: int, world: int) -> list[TrainLoader]:
        return [TrainLoader(data_dir, SEQ, micro, 4, r, world, step_windows=step) for r in range(world)]

    def steps(readers: list[TrainLoader], count: int) -> list[list[tuple[int, ...]]]:
        out = []
        for _ in range(count):
            rows, epochs = [], set()
            for _ in range(step // (readers[0].micro_batch_size * len(readers))):
                for lo in readers:
                    rows += [tuple(row) for row in lo.next_batch()[0].tolist()]
                    epochs.add(lo.epoch)
            assert len(epochs) == 1, "a step took windows of two epochs"
            out.append(sorted(rows))
        return out

    whole = steps(loaders(6, 1), count)
    assert all(steps(loaders(micro, world), count) == whole for micro, world in [(3, 1), (2, 1), (1, 1), (2, 3)])
    assert all(len(set(rows)) == step for rows in whole)  # no window twice in a step
    before = loaders(6, 1)
    first = steps(before, n // step + 1)  # into the second epoch
    (after,) = loaders(3, 1)
    after.load_state_dict(before[0].state_dict())
    assert first + steps([after], count - len(first)) == whole


def test_ranks_read_disjoint_slices_of_the_global_batch(data_dir):
    single = TrainLoader(data_dir, SEQ, micro_batch_size=6, seed=9)
    ranks = [TrainLoader(data_dir, SEQ, micro_batch_size=2, seed=9, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):
        x, y = single.next_batch()
        parts = [rk.next_batch() for rk in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        rows = [tuple(r) for p in parts for r in p[0].tolist()]
        assert len(set(rows)) == len(rows)
    assert ranks[0].state_dict() == ranks[2].state_dict()


def test_eval_batches_are_the_first_val_tokens_in_order(data_dir):
    val = stream_of(data_dir, "val")
    batches = list(eval_batches(data_dir, seq_len=4, batch_size=3, eval_tokens=28))
    assert [x.shape[0] for x, _ in batches] == [3, 3, 1]
    xs = torch.cat([x for x, _ in batches]).flatten().numpy()
    ys = torch.cat([y for _, y in batches]).flatten().numpy()
    np.testing.assert_array_equal(xs, val[:28])
    np.testing.assert_array_equal(ys, val[1:29])
    again = list(eval_batches(data_dir, seq_len=4, batch_size=3, eval_tokens=28))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    # asking for more than the split holds gives all of it
    total = sum(x.numel() for x, _ in eval_batches(data_dir, seq_len=4, batch_size=3, eval_tokens=10**9))
    assert total == (len(val) - 1) // 4 * 4


def test_errors_name_the_directory_and_counts(tmp_path, data_dir):
    with pytest.raises(AxiomError, match="manifest.json not found"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(AxiomError, match="manifest.json: not valid JSON .*run `axiom prepare` again"):
        read_manifest(tmp_path / "bad")
    (tmp_path / "bad" / "manifest.json").write_text('{"format_version": 1}')
    with pytest.raises(AxiomError, match="missing keys tokenizer"):
        read_manifest(tmp_path / "bad")
    tiny = tmp_path / "tiny"
    write_dataset(tiny, [[1, 2, 3]] * 5, [[4]])
    with pytest.raises(AxiomError, match=r"tiny: the train split has 20 tokens.*4 windows of 8\+1"):
        TrainLoader(tiny, SEQ, micro_batch_size=2, seed=0, world_size=2)
    with pytest.raises(AxiomError, match="val split has 2 tokens"):
        next(eval_batches(tiny, seq_len=4, batch_size=1, eval_tokens=100))
    # a truncated shard is caught before training reads garbage
    shard = data_dir / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(AxiomError, match="train_00001.bin: 144 bytes, manifest says 37 tokens"):
        TrainLoader(data_dir, SEQ, micro_batch_size=1, seed=0)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux /proc")
def test_a_reader_that_fails_holds_no_shard_open_while_its_error_is_kept(data_dir):
    """A notebook or a server keeps the error, and with its traceback the frames that held the mapped shards."""
    stream = TokenStream(data_dir, "train")
    assert len(held_under(data_dir)) == 2 * len(stream.shards) > 2  # a map and a descriptor per shard
    stream.close()
    assert held_under(data_dir) == []
    kept: list = []

    def fails(match, call):
        fails_holding_nothing(data_dir, kept, match, call)

    fails("fewer than one global batch", lambda: TrainLoader(data_dir, SEQ, micro_batch_size=1000, seed=0))
    fails("fewer than one window", lambda: next(eval_batches(data_dir, seq_len=1000, batch_size=1, eval_tokens=1000)))
    # the last shard fails its check after the others were mapped: an id out of range, then a cut file
    last = sorted(data_dir.glob("train_*.bin"))[-1]
    good = last.read_bytes()
    last.write_bytes(np.array([10**9], dtype="<u4").tobytes() + good[4:])
    fails("token id 1,000,000,000 at token 0", lambda: TokenStream(data_dir, "train"))
    last.write_bytes(good[:-4])
    fails("bytes, manifest says", lambda: TokenStream(data_dir, "train"))
