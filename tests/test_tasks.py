"""Multiple-choice evaluation: the native scorer against plain forward passes and hand-computed metrics, against
lm-eval-harness's own request and metric code (through the Axiom adapter and through its HF model on an export),
task-file errors, the harness adapter's generation and rolling log-likelihoods, and `axiom eval` flags.

CPU and offline; lm-eval runs in-process on inline JSON tasks (no task index, no Hub)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import micro_config, read_rows, save_model

from axiom.cli import main
from axiom.config import Config, ModelConfig, TrainConfig
from axiom.errors import AxiomError
from axiom.eval import tasks as tasks_module
from axiom.eval.tasks import (
    choice_loglikelihoods,
    encode_pair,
    loglikelihoods,
    read_task_file,
    score,
)
from axiom.infer.generate import generate
from axiom.model.transformer import Axiom
from axiom.text.tokenizer import EOS_ID, load_tokenizer

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

FULL = ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_multiple_of=64, max_seq_len=128)
THREE = [  # a context ending in a space, one ending in a newline, choices of different lengths
    {"context": "The sky is", "choices": ["blue", "green"], "answer": 0},
    {"context": "Two plus two equals ", "choices": ["four", "five", "twenty-two"], "answer": 0},
    {
        "context": "In the beginning\n",
        "choices": ["God created the heaven and the earth.", "was the word"],
        "answer": 1,
    },
]
# HellaSwag as released (and as llm.c downloads it): lm-eval's hellaswag task rewrites these fields
HELLASWAG = [
    {
        "ind": 4,
        "activity_label": "Removing ice from car",
        "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
        "smiles.",
        "ctx_b": "then",
        "ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
        "smiles. then",
        "endings": [
            ", the man adds wax to the windshield and cuts it.",
            ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes "
            "snow as the we girls sled.",
            ", the man puts on a christmas coat, knitted with netting.",
            ", the man continues removing the snow on his car.",
        ],
        "label": 3,
    },
    {
        "ind": 9,
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to grow [title] Choose a pot. [step] Pick one with drainage holes.",
        "ctx_b": "you",
        "ctx": "[header] How to grow [title] Choose a pot. [step] Pick one with drainage holes. you",
        "endings": [
            "should water it [substeps] daily.",
            "can use any container at all.",
            "will need soil [title] Fill it.",
            "might paint the pot first.",
        ],
        "label": "0",
    },
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random model with cl100k's full vocabulary (seed 2: on THREE, acc and acc_norm differ)."""
    torch.manual_seed(2)
    model = Axiom(FULL).eval()
    path = tmp_path_factory.mktemp("ckpt")
    save_model(model, Config(FULL, TrainConfig(dtype="float32")), path, step=0, tokens=0)
    return model, path


def plain_loglikelihood(model: Axiom, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One full forward pass without a cache over the (left-truncated) sequence, as lm-eval's HF model does."""
    seq = (context + continuation)[-(model.cfg.max_seq_len + 1) :]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq[:-1]]))[0].double(), -1)
    rows = logp[len(seq) - 1 - len(continuation) :]
    targets = torch.tensor(continuation)
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


def test_scorer_matches_plain_forward_with_shared_contexts_and_truncation():
    cfg = micro_config().model  # vocab 512, max_seq_len 32
    torch.manual_seed(1)
    model = Axiom(cfg).eval()
    rng = random.Random(0)
    requests = []
    for _ in range(12):  # contexts up to 40 tokens: some are cut on the left, differently per continuation length
        context = [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 40))]
        for _ in range(rng.randint(1, 4)):
            requests.append((context, [rng.randrange(cfg.vocab_size) for _ in range(rng.randint(1, 12))]))
    requests.append((requests[0][0], [7]))  # single-token continuations only: no second pass
    requests.append(([3] * 5, [int(model(torch.tensor([[3] * 5]))[0, -1].argmax())]))  # a greedy continuation
    got = loglikelihoods(model, requests, batch_size=3)
    for request, (ll, greedy) in zip(requests, got, strict=True):
        want_ll, want_greedy = plain_loglikelihood(model, *request)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy
    assert got[-1][1]


def test_each_context_runs_once_and_items_batch(ckpt):
    """One pass over a shared context into the cache, then all endings in one pass: tokens through the model are
    the context once plus each ending without its last token, in two forward calls for a whole batch."""
    model, _ = ckpt
    calls = []
    hook = model.embed.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    try:
        context = list(range(1000, 1030))
        endings = [[5, 6, 7, 8, 9], [5, 6], [11, 12, 13], [14]]
        loglikelihoods(model, [(context, e) for e in endings] + [(context[:20], e) for e in endings], batch_size=8)
    finally:
        hook.remove()
    assert calls == [(2, 30), (8, 4)]  # contexts (left-padded to 30), then 8 endings of at most 4 input tokens


def test_hand_computed_three_item_file_and_limit(ckpt, tmp_path, capsys):
    model, path = ckpt
    enc = load_tokenizer()
    file = write_jsonl(tmp_path / "three.jsonl", THREE)
    # item 2's trailing space moves to the continuation, whose first token is then a lone space
    context, continuation = encode_pair(THREE[1]["context"], " four")
    assert enc.decode(context) == "Two plus two equals" and enc.decode(continuation) == "  four"

    lls = []
    for row in THREE:
        context = row["context"].rstrip()
        moved = row["context"][len(context) :]
        ids = enc.encode_ordinary(context)
        item = []
        for choice in row["choices"]:
            whole = enc.encode_ordinary(context + moved + " " + choice)
            item.append(plain_loglikelihood(model, ids, whole[len(ids) :])[0])
        lls.append(item)
    got = choice_loglikelihoods(model, read_task_file(file))
    assert [x for item in got for x in item] == pytest.approx([x for item in lls for x in item], abs=1e-4)
    acc = [float(max(range(len(ll)), key=ll.__getitem__) == r["answer"]) for ll, r in zip(lls, THREE, strict=True)]
    norm = [
        float(max(range(len(ll)), key=lambda i: ll[i] / len(r["choices"][i])) == r["answer"])
        for ll, r in zip(lls, THREE, strict=True)
    ]
    assert acc == [0.0, 0.0, 1.0] and norm == [0.0, 0.0, 0.0]  # the normalisation changes the third answer

    def stderr(xs):
        mu = sum(xs) / len(xs)
        return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    assert main(["eval", "--ckpt", str(path), "--task-file", file, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["task_files"][file]
    assert (
        out["n"] == 3 and out["acc"] == pytest.approx(sum(acc) / 3) and out["acc_norm"] == pytest.approx(sum(norm) / 3)
    )
    assert out["acc_stderr"] == pytest.approx(stderr(acc)) and out["acc_norm_stderr"] == pytest.approx(stderr(norm))

    assert main(["eval", "--ckpt", str(path), "--task-file", file, "--limit", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["task_files"][file]
    assert out["n"] == 2 and out["acc"] == pytest.approx(sum(acc[:2]) / 2)
    assert out["acc_norm"] == pytest.approx(sum(norm[:2]) / 2)

    assert main(["eval", "--ckpt", str(path), "--task-file", file, "--limit", "1"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["task", "n", "acc", "acc_norm"]
    assert table[2].split()[:4] == ["three", "(file)", "1", f"{acc[0]:.4f}"] and "N/A" in table[2]


def lm_eval_on_file(lm, tasks: list[dict]):
    """lm-eval's simple_evaluate on inline JSON tasks, per-document samples logged."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False), log_samples=True)
    return out["results"], out["samples"]


def test_native_scorer_gives_lm_eval_acc_and_acc_norm(ckpt, tmp_path):
    """The same items through lm-eval's own requests and metrics: with the Axiom adapter, and with lm-eval's HF
    model on an `axiom export` folder (full forward passes, the exported tokenizer) as an independent reference."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    from lm_eval.tasks.hellaswag.utils import process_docs

    from axiom.eval.harness import AxiomLM, json_task

    model, path = ckpt
    generic = write_jsonl(tmp_path / "generic.jsonl", THREE * 2 + [{**THREE[0], "context": ""}])
    hellaswag = write_jsonl(tmp_path / "hellaswag.jsonl", HELLASWAG)
    hellaswag_task = {
        **json_task("hs", hellaswag, ("query", "choices", "gold")),
        "process_docs": process_docs,  # lm-eval's own hellaswag preprocessing
        "doc_to_choice": "choices",
    }
    tasks = [json_task("generic", generic), hellaswag_task]
    native = {
        "generic": read_task_file(generic),
        "hs": read_task_file(hellaswag),
    }
    assert native["hs"][1].context == "Home and Garden: How to grow. Choose a pot. Pick one with drainage holes. You"
    lls = {name: choice_loglikelihoods(model, items) for name, items in native.items()}

    references = [AxiomLM(model, batch_size=4)]
    if _has("transformers") and _has("accelerate"):  # the hf extra (in dev)
        from lm_eval.models.huggingface import HFLM

        from axiom.interop.export import export

        folder = export(path, tmp_path / "hf", "axiom")
        references.append(HFLM(pretrained=str(folder), trust_remote_code=True, dtype="float32", device="cpu"))
    for lm in references:
        results, samples = lm_eval_on_file(lm, tasks)
        for name, items in native.items():
            mine = score(name, items, lls[name])
            assert results[name]["acc,none"] == mine.acc and results[name]["acc_norm,none"] == mine.acc_norm
            assert results[name]["acc_stderr,none"] == pytest.approx(mine.acc_stderr)
            for sample in samples[name]:
                got = [float(r[0]) for r in sample["filtered_resps"]]
                assert got == pytest.approx(lls[name][sample["doc_id"]], abs=1e-4)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def test_tasks_without_a_usable_lm_eval_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    """Absent: the extra to install. Present but too old to import what the adapter needs (lm-eval 0.4.9 satisfied
    the extra's old floor): not the same advice again, which pip answers with "already satisfied"."""
    args = ["eval", "--ckpt", str(tmp_path), "--tasks", "hellaswag"]
    monkeypatch.setitem(sys.modules, "axiom.eval.harness", None)  # its import now fails
    if importlib.util.find_spec("lm_eval") is not None:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "lm-evaluation-harness is installed but does not import as axiom needs it" in err
        assert err.rstrip().endswith("pip install -U 'lm-eval[hf]>=0.4.10'") and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "axiom eval: error: --tasks needs lm_eval, which is not installed: pip install 'axiom-lm[eval]'\n"
    )


def test_adapter_takes_lm_evals_batch_sizes(ckpt):
    """ "auto" / "auto:N" (lm-eval's command line and simple_evaluate) take the scorer's default; a number may come
    as a string; anything else is one line (int("auto") raised ValueError)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    from axiom.eval.harness import AxiomLM

    model, _ = ckpt
    for given, taken in [("auto", 16), ("auto:4", 16), ("8", 8), (3, 3)]:
        assert AxiomLM(model, batch_size=given).batch_size == taken
    for bad in ("x", "0", -1):
        with pytest.raises(AxiomError, match=f"batch_size={bad!r} must be a whole number of at least 1, or auto"):
            AxiomLM(model, batch_size=bad)


def test_adapter_rolling_loglikelihood_and_generation(ckpt):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from axiom.eval.harness import AxiomLM

    model, _ = ckpt
    enc = load_tokenizer()
    lm = AxiomLM(model, batch_size=2)
    short, long = "The sky is blue.", " ".join(["In the beginning God created the heaven and the earth."] * 30)
    assert len(enc.encode_ordinary(long)) > 2 * FULL.max_seq_len  # three windows
    requests = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in (short, long)]
    got = lm.loglikelihood_rolling(requests)
    for text, total in zip((short, long), got, strict=True):
        windows = get_rolling_token_windows(enc.encode_ordinary(text), EOS_ID, FULL.max_seq_len, 1)
        want = sum(plain_loglikelihood(model, *make_disjoint_window(w))[0] for w in windows)
        assert total == pytest.approx(want, abs=1e-3)
    ids = enc.encode_ordinary(short)
    assert got[0] == pytest.approx(plain_loglikelihood(model, [EOS_ID], ids)[0], abs=1e-4)

    prompts = ["The sky is", "Two plus two equals"]
    greedy = generate(model, [enc.encode_ordinary(p) for p in prompts], 12, temperature=0)
    texts = [enc.decode(g) for g in greedy]
    stop = texts[0][3:6]  # a stop string inside the first row's text; the second row runs to max_gen_toks
    requests = [Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": 12}), 0) for p in prompts]
    out = lm.generate_until(requests)
    assert out[0] == texts[0].split(stop)[0]
    assert out[1] == (texts[1].split(stop)[0] if stop in texts[1] else texts[1])


def test_bad_task_files_are_one_line_errors(ckpt, tmp_path, capsys):
    good = json.dumps(THREE[0])
    cases = {
        "missing-answer": ([good, json.dumps({"context": "a", "choices": ["b", "c"]})], ":2: missing field 'answer'"),
        "missing-endings": ([json.dumps({"ctx": "a", "label": 0})], ":1: missing field 'endings'"),
        "label-range": ([json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 2})], "'label' is 2, out of range"),
        "negative": ([json.dumps({**THREE[0], "answer": -1})], "'answer' is -1, out of range for 2"),
        "label-type": ([json.dumps({**THREE[0], "answer": True})], "'answer' must be an integer index"),
        "label-digit": ([json.dumps({**THREE[0], "answer": "\u00b2"})], "'answer' must be an integer index"),
        "choices": ([json.dumps({**THREE[0], "choices": ["only one"]})], "at least two non-empty strings"),
        "context": ([json.dumps({**THREE[0], "context": 3})], "field 'context' must be a string"),
        "bad-json": ([good, "", '{"context": "a",'], ":3: not valid JSON"),
        "not-object": (["[1, 2]"], ":1: expected a JSON object"),
        "empty": (["", "  "], "empty.jsonl: no items"),
        "emptied-ending": (  # HellaSwag's markup removed, nothing is left: a ZeroDivisionError after all the scoring
            [
                json.dumps(
                    {
                        "activity_label": "C",
                        "ctx_a": "A man.",
                        "ctx_b": "he",
                        "ctx": "x",
                        "endings": ["[h]", "b."],
                        "label": 1,
                    }
                )
            ],
            ":1: ending 0 is empty once its bracketed WikiHow markup is removed",
        ),
    }
    for name, (lines, message) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", lines)
        with pytest.raises(AxiomError, match=message):
            read_task_file(path)
        assert main(["eval", "--ckpt", str(ckpt[1]), "--task-file", path]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path in err and message.lstrip(":") in err
    context = "a\u2028b\u2029c\x85d"  # line separators to str.splitlines, not to JSON Lines: written raw, valid
    items = read_task_file(
        write_jsonl(
            tmp_path / "separators.jsonl", [json.dumps({**THREE[0], "context": context}, ensure_ascii=False), good]
        )
    )
    assert [item.context for item in items] == [context, THREE[0]["context"]] and items[1].where.endswith(":2")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"context": "caf\xe9"}\n')
    with pytest.raises(AxiomError, match="not UTF-8"):
        read_task_file(tmp_path / "latin1.jsonl")
    with pytest.raises(AxiomError, match="no such file"):
        read_task_file(tmp_path / "missing.jsonl")


def test_items_that_do_not_fit_the_model(ckpt, tmp_path, capsys, monkeypatch):
    """A context longer than the model's is cut on the left (lm-eval's truncation); a choice longer than the model's
    context, or text with ids beyond its vocabulary, is refused in one line naming the item, before anything is
    scored; a whitespace-only context is EOS, as an empty one."""
    model, path = ckpt
    long_context = {"context": "word " * 300, "choices": ["a", "b"], "answer": 0}
    file = write_jsonl(tmp_path / "long-context.jsonl", [long_context])
    assert len(encode_pair(long_context["context"], " a")[0]) > FULL.max_seq_len
    assert main(["eval", "--ckpt", str(path), "--task-file", file, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task_files"][file]["n"] == 1
    assert encode_pair(" \n ", " a") == ([EOS_ID], load_tokenizer().encode_ordinary(" \n  a"))
    ws = write_jsonl(tmp_path / "ws.jsonl", [{**THREE[0], "context": "   "}])
    assert main(["eval", "--ckpt", str(path), "--task-file", ws, "--json"]) == 0

    scored = []
    monkeypatch.setattr(tasks_module, "loglikelihoods", lambda *a, **k: scored.append(a) or [])
    long_choice = {"context": "The sky is", "choices": ["blue", "very " * 130 + "blue"], "answer": 0}
    bad = write_jsonl(tmp_path / "long-choice.jsonl", [THREE[0], "", long_choice])
    n = len(encode_pair("The sky is", " " + long_choice["choices"][1])[1])
    assert main(["eval", "--ckpt", str(path), "--task-file", file, "--task-file", bad]) == 2
    err = capsys.readouterr().err
    want = f"{bad}:3: choice 1: the continuation is {n} tokens, more than the model's context of 128"
    assert err.count("\n") == 1 and want in err and "shorten it or leave the item out" in err
    torch.manual_seed(0)
    small = micro_config().model  # vocab_size 512: cl100k text has larger ids
    (tmp_path / "small").mkdir()
    save_model(Axiom(small), Config(small, TrainConfig()), tmp_path / "small", step=0, tokens=0)
    assert main(["eval", "--ckpt", str(tmp_path / "small"), "--task-file", file]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{file}:1: choice 0: token id " in err
    assert "outside the model's vocab_size 512: use a model with cl100k_base's 100,277 ids" in err
    assert not scored  # refused before the first file was scored
    with pytest.raises(AxiomError, match="loglikelihood request 2 of 2: the continuation is 129 tokens"):
        loglikelihoods(model, [([1], [2]), ([1], list(range(129)))])  # as lm-eval's requests reach the adapter


def test_tasks_offline_stop_within_seconds(ckpt, tmp_path):
    """--tasks with a Hub that does not answer: one line naming the tasks within seconds of asking it once, not after
    the Hub client's retries (half a minute or more), and before the model loads (its weights here are garbage, which
    loading would report); the offline variables unset, so that the client would try. Timed from the question, not
    the launch: on a loaded 2-core machine importing torch and lm-eval alone took 30 s."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    unloadable = Path(shutil.copytree(ckpt[1], tmp_path / "ckpt"))
    (unloadable / "model.safetensors").write_bytes(b"garbage")
    asked: list[float] = []  # when each connection came; each is closed unanswered

    def answer_none(hub: socket.socket, done: threading.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                hub.accept()[0].close()
                asked.append(time.monotonic())

    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    argv = [sys.executable, "-m", "axiom.cli", "eval", "--ckpt", str(unloadable), "--tasks", "hellaswag,arc_easy"]
    with socket.create_server(("127.0.0.1", 0)) as hub:
        hub.settimeout(0.1)
        port, done = hub.getsockname()[1], threading.Event()
        env |= {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        listener = threading.Thread(target=answer_none, args=(hub, done))
        listener.start()
        try:
            failed = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
            ended = time.monotonic()
        finally:
            done.set()
            listener.join()
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert failed.stderr.count("\n") == 1 and "Retrying" not in failed.stderr, failed.stderr[-2000:]
    assert "--tasks hellaswag,arc_easy: the task data could not be fetched" in failed.stderr
    assert f"http://127.0.0.1:{port} does not answer" in failed.stderr and "--task-file PATH" in failed.stderr
    assert len(asked) == 1 and ended - asked[0] < 20, (asked, ended)  # asked once, then the line at once


def test_a_hub_that_refuses_is_one_line_at_once(monkeypatch):
    """The commonest offline case, nothing listening at the Hub's address (a refused connection), is the same one
    line as a Hub that does not answer, without the client's retries."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    from datasets import config as datasets_config
    from huggingface_hub import constants as hub_constants

    from axiom.eval.harness import check_hub, json_task

    with socket.create_server(("127.0.0.1", 0)) as closed:
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
    started = time.monotonic()
    with pytest.raises(AxiomError) as refused:
        check_hub(["hellaswag"])
    assert str(refused.value).startswith(
        f"--tasks hellaswag: the task data could not be fetched from the Hugging Face Hub ({endpoint} does not answer:"
    )
    assert "--task-file PATH" in str(refused.value) and time.monotonic() - started < 5
    check_hub([json_task("local", "three.jsonl")])  # a task of local data asks nothing


def test_eval_flags(ckpt, tmp_path, capsys):
    path = str(ckpt[1])
    file = write_jsonl(tmp_path / "three.jsonl", THREE)
    for args, message in [
        ([], "nothing to evaluate: pass --data DIR, --tasks NAMES or --task-file PATH"),
        (["--task-file", file, "--limit", "0"], "--limit 0: must be a positive"),
        (["--task-file", file, "--num-fewshot", "5"], "--num-fewshot 5: applies to --tasks only"),
    ]:
        assert main(["eval", "--ckpt", path, *args]) == 2
        assert message in capsys.readouterr().err


def test_unreachable_task_data_names_the_offline_options(ckpt):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    from lm_eval.tasks import TaskManager

    from axiom.eval.harness import run_tasks

    hub_task = {**json_for_hub(), "task": "hub_only"}
    with pytest.raises(AxiomError, match=r"could not be fetched .* --task-file PATH.*HF_DATASETS_OFFLINE=1"):
        run_tasks(ckpt[0], [hub_task], task_manager=TaskManager(include_defaults=False))


def yaml_task(path: Path, name: str, dataset: str) -> Path:
    """An lm-eval YAML task scoring THREE's fields (context, choices, answer) in its test split, given a
    `dataset` line such as `dataset_path: json` and the data files."""
    path.write_text(
        f"task: {name}\n{dataset}\ntest_split: test\nfewshot_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return path


@pytest.fixture
def unanswered_hub(monkeypatch):
    """The Hub's address a socket that listens but never answers; returns a function saying whether anything
    connected to it (a connection waits in the socket's backlog, accepted or not: no race)."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    from datasets import config as datasets_config  # lm-eval's dependency
    from huggingface_hub import constants as hub_constants

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(datasets_config, "HF_ENDPOINT", endpoint)

    def asked() -> bool:
        try:
            listener.accept()[0].close()
        except BlockingIOError:
            return False
        return True

    yield asked
    listener.close()


def test_a_local_yaml_task_runs_offline_and_too_many_shots_are_one_line(ckpt, tmp_path, capsys, unanswered_hub):
    """An lm-eval YAML task whose data is a local file needs no Hub: it runs while the Hub does not answer (it was
    refused as "could not be fetched"); asking it for more shots than its examples is one line (a ValueError
    traceback)."""
    from datasets import config as datasets_config

    from axiom.eval.harness import needs_hub

    data = write_jsonl(tmp_path / "three.jsonl", THREE)
    task = yaml_task(
        tmp_path / "mytask.yaml", "mytask", f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}"
    )
    assert not needs_hub(str(task)) and needs_hub("hellaswag")
    (hub := tmp_path / "hub.yaml").write_text("task: hub\ndataset_path: Rowan/hellaswag\n")
    assert needs_hub(str(hub))
    with pytest.MonkeyPatch.context() as online:  # the Hub is asked where a task needs it: this one does not
        online.setattr(datasets_config, "HF_HUB_OFFLINE", False)
        assert run_yaml_task(ckpt[0], task)["acc,none"] in (0, 1 / 3, 2 / 3, 1) and not unanswered_hub()
    assert main(["eval", "--ckpt", str(ckpt[1]), "--tasks", str(task), "--num-fewshot", "10"]) == 2
    err = capsys.readouterr().err  # datasets' progress bars first
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"axiom eval: error: --num-fewshot 10: a task of {task} has fewer examples to draw the shots from; ask for "
        "fewer"
    )


def test_offline_tasks_ask_nothing_and_read_the_cache(ckpt, tmp_path, monkeypatch, unanswered_hub):
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE set: a task whose data lives on the Hub is read from the datasets cache
    as `datasets` left it, and nothing asks the Hub (its unanswered address would stop the run for seconds)."""
    import pyarrow as pa
    from datasets import DatasetInfo, Features, SplitDict, SplitInfo
    from datasets import config as datasets_config

    cache = tmp_path / "datasets"
    cached = cache / "axiomtest___three" / "default" / "0.0.0" / "0123456789abcdef"
    cached.mkdir(parents=True)
    table = pa.Table.from_pylist(THREE)
    with pa.OSFile(str(cached / "three-test.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    splits = SplitDict({"test": SplitInfo("test", num_examples=len(THREE), dataset_name="three")})
    info = DatasetInfo(features=Features.from_arrow_schema(table.schema), splits=splits)
    info.config_name, info.dataset_name = "default", "three"
    info.write_to_directory(str(cached))
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True)  # what either variable sets
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", cache)
    task = yaml_task(tmp_path / "hubtask.yaml", "hubtask", "dataset_path: axiomtest/three")
    assert run_yaml_task(ckpt[0], task)["acc,none"] in (0, 1 / 3, 2 / 3, 1) and not unanswered_hub()


def run_yaml_task(model: Axiom, task: Path) -> dict:
    """`run_tasks` on a YAML task as `axiom eval --tasks PATH` runs it, with a task index of its folder alone (the
    whole of lm-eval's takes seconds to build): the task's results."""
    from lm_eval.tasks import TaskManager

    from axiom.eval.harness import run_tasks

    index = TaskManager(include_defaults=False, include_path=str(task.parent))
    return run_tasks(model, [str(task)], task_manager=index)["results"][task.stem]


def json_for_hub() -> dict:
    """hellaswag's own config: its data lives on the Hub, which tests (offline) cannot reach."""
    return {
        "dataset_path": "Rowan/hellaswag",
        "validation_split": "validation",
        "output_type": "multiple_choice",
        "doc_to_text": "{{ctx}}",
        "doc_to_choice": "{{endings}}",
        "doc_to_target": "{{label}}",
    }


def test_eval_tasks_config_and_loading(tmp_path):
    from axiom.config import get_config
    from axiom.eval.tasks import evaluate_tasks, load_tasks, task_columns

    a, b = write_jsonl(tmp_path / "kjv-val.jsonl", THREE), write_jsonl(tmp_path / "b.jsonl", THREE[:2])
    cfg = get_config("tiny", [f"eval_tasks={a} , {b}"])
    assert cfg.train.task_files == [a, b]
    for bad in (f"{a},,{b}", f"{a},{a}", ","):
        with pytest.raises(AxiomError, match="eval_tasks=.* must be distinct task file paths"):
            get_config("tiny", [f"eval_tasks={bad}"])
    tasks = load_tasks(cfg.train.task_files)
    assert task_columns(tasks) == ("kjv_val_acc", "kjv_val_acc_norm", "b_acc", "b_acc_norm")
    (tmp_path / "sub").mkdir()
    with pytest.raises(AxiomError, match="both named 'b'"):
        load_tasks([b, write_jsonl(tmp_path / "sub" / "b.jsonl", THREE)])
    torch.manual_seed(2)
    row = evaluate_tasks(Axiom(FULL), tasks)
    assert row == {"kjv_val_acc": 1 / 3, "kjv_val_acc_norm": 0.0, "b_acc": 0.0, "b_acc_norm": 0.0}


def test_plot_draws_a_task_panel(tmp_path):
    pytest.importorskip("matplotlib", reason="axiom plot needs the plot extra")
    import matplotlib.pyplot as plt

    from axiom.train.plot import plot_run

    header = "step,tokens,train_loss,val_loss,val_ppl,val_bpb,kjv_acc,kjv_acc_norm\n"
    (tmp_path / "eval.csv").write_text(
        header + "0,0,nan,11.5,9.8e4,4.0,0.25,0.24\n10,1280,9.0,8.5,4914.8,3.0,0.3,0.31\n"
    )
    height, width, _ = plt.imread(plot_run(tmp_path)).shape
    assert height > 0.9 * width  # two panels, one above the other (loss alone is 8 x 5)


def test_training_logs_task_columns_in_eval_csv(tiny_data, tmp_path):

    from axiom.eval.tasks import evaluate_tasks, load_tasks
    from axiom.model.checkpoint import list_checkpoints, load_model
    from axiom.train.evaluator import EVAL_COLUMNS
    from axiom.train.launch import train

    file = write_jsonl(tmp_path / "three.jsonl", THREE)
    sets = ["vocab_size=100277", "max_steps=4", "eval_interval=2", "checkpoint_interval=4", f"eval_tasks={file}"]
    run = tmp_path / "run"
    train(micro_config(*sets), tiny_data, run)
    rows = read_rows(run / "eval.csv")
    assert tuple(rows[0]) == (*EVAL_COLUMNS, "three_acc", "three_acc_norm")
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    model = load_model(list_checkpoints(run / "checkpoints")[-1][1])[0]  # step 4
    want = evaluate_tasks(model, load_tasks([file]))
    assert {k: float(rows[-1][k]) for k in want} == want
    assert f"three_acc {want['three_acc']:.4f}, three_acc_norm" in (run / "train.log").read_text()

    bad = write_jsonl(tmp_path / "bad.jsonl", [json.dumps({"context": "a"})])
    with pytest.raises(AxiomError, match="bad.jsonl:1: missing field 'choices'"):
        train(micro_config(*sets[:-1], f"eval_tasks={bad}"), tiny_data, tmp_path / "run2")
    assert not list_checkpoints(tmp_path / "run2" / "checkpoints")


def test_lambada_style_task_through_the_adapter_and_the_table(ckpt, tmp_path):
    """A loglikelihood task as lm-eval's lambada_openai defines it (last word; perplexity and greedy acc), on a local
    file: the harness's numbers equal plain computations and the table gets a perplexity column."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is optional: pip install 'axiom-lm[eval]'")
    from lm_eval.tasks import TaskManager

    from axiom.cli.eval import harness_rows, task_table
    from axiom.eval.harness import run_tasks

    model, _ = ckpt
    texts = ["In the beginning God created the heaven and the earth", "The sky is blue", "Two plus two equals four"]
    path = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    task = {
        "task": "last_word",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": path}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",  # lambada_openai's own templates
        "doc_to_target": "{{' '+text.split(' ')[-1]}}",
        "metric_list": [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ],
    }
    results = run_tasks(model, [task], task_manager=TaskManager(include_defaults=False))
    pairs = [t.rsplit(" ", 1) for t in texts]  # (passage without its last word, the word)
    lls = [plain_loglikelihood(model, *encode_pair(context, " " + word)) for context, word in pairs]
    metrics = results["results"]["last_word"]
    assert metrics["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in lls) / 3), rel=1e-4)
    assert metrics["acc,none"] == pytest.approx(sum(g for _, g in lls) / 3)
    table = task_table(harness_rows(results)).splitlines()
    assert table[0].split() == ["task", "n", "acc", "acc_norm", "perplexity"]
    cells = table[1].split()  # task, n, acc ± err, acc_norm "-", perplexity ± err
    assert cells[:3] == ["last_word", "3", f"{metrics['acc,none']:.4f}"] and cells[5] == "-"
    assert cells[6] == f"{metrics['perplexity,none']:.2f}"
