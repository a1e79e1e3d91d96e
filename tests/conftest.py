"""Shared fixtures: tiny prepared data directories and micro model configs that train in a second on a CPU."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from data_helpers import write_dataset

from axiom.config import Config, get_config
from axiom.data.loader import TOKEN_DTYPE
from axiom.infer import kernels
from axiom.model.checkpoint import save_weights
from axiom.model.transformer import Axiom
from axiom.text.tokenizer import EOS_ID

# Under pytest-xdist (`make test` runs a worker per core), one thread each: two workers of two threads on two cores
# would fight over them. Subprocesses inherit the variable.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
# A CUDA build of torch on a machine without a GPU (PyPI's Linux wheel; seen with 2.11) makes the first thread to enter
# FakeTensorMode, as every torch.compile does, the owner of the fake CUDA device guard that all threads then use. When
# that thread ends (a compiled Service's engine thread, test_serve.py), the next compile in this process reads the
# freed guard and segfaults now and then (pytorch/pytorch#178950). Set here, the guard belongs to the main thread.
if torch.version.cuda and not torch.cuda.is_available():
    torch._C._ensureCUDADeviceGuardSet()
# The longest files first: `--dist loadfile` hands whole files to the workers in order, so a long one started last
# would run on alone.
LONGEST_FIRST = ("test_docs.py", "test_gpu_check.py", "test_chat.py", "test_serve.py")


def pytest_sessionstart(session: pytest.Session) -> None:
    """The CPU decode kernels built (or loaded) before any test runs. A fresh clone's first build takes from 30 s to
    over 150 s on a loaded 2-core machine; left to the first test that decodes, every other process decoding meanwhile
    (a worker, a command a test starts) waited for it inside its test: a server missed its 120 s to start, a command
    printed the wait notice into the output its test checks. Under xdist this runs in the controller before any
    worker starts (xdist's own hook, which starts them, runs last)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        kernels.available()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


# Tests that take the `device` fixture (or a fixture built on DEVICES) run once per available device, with ids
# "cpu" and "cuda": `pytest -k cuda` runs the GPU ones (scripts/gpu_check.sh does, on a lent GPU).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture
def fresh_compiler():
    """torch.compile's caches emptied before and after the test, so that what it compiles does not depend on the
    tests before it: dynamo keeps the compiled variants of a code object (an engine's decoding step, shared by every
    engine) for the whole process, and counts them against its recompile limit."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


MICRO_VOCAB = 512  # a 100k-way softmax would be most of every test's time; tiny_data's ids stay below this
MICRO = [
    f"vocab_size={MICRO_VOCAB}",
    "d_model=32",
    "n_layers=2",
    "n_heads=2",
    "n_kv_heads=1",
    "ffn_multiple_of=32",
    "max_seq_len=32",
    "seq_len=32",
    "micro_batch_size=2",
    "grad_accum_steps=2",
    "warmup_steps=2",
    "lr_max=3e-3",
    "lr_min=3e-4",
    "eval_tokens=256",
    "log_interval=1",
    "optimizer=adamw",
]


def micro_config(*overrides: str) -> Config:
    """The micro model, then `overrides` (NAME=VALUE); 128 tokens per optimizer step."""
    return get_config("tiny", [*MICRO, *overrides])


def micro_args(*overrides: str) -> list[str]:
    """The same as `axiom train` arguments."""
    return [arg for item in [*MICRO, *overrides] for arg in ("--set", item)]


def _patterned_docs(n: int, seed: int) -> list[list[int]]:
    """Documents that walk a fixed cycle of 24 token ids from a random start: easy to learn, so loss falls fast."""
    cycle = [3 + 19 * i for i in range(24)]
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        start, length = rng.randrange(24), rng.randint(20, 60)
        docs.append([cycle[(start + i) % 24] for i in range(length)])
    return docs


def write_micro_dataset(path: Path, train: list[list[int]], val: list[list[int]]) -> Path:
    """`write_dataset` for the micro model: all ids below MICRO_VOCAB, EOS stored as id 0 instead of 100257."""
    manifest = write_dataset(path, train, val)
    for shard in manifest["shards"]:
        tokens = np.fromfile(path / shard["file"], dtype=TOKEN_DTYPE)
        tokens[tokens == EOS_ID] = 0
        tokens.tofile(path / shard["file"])
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared directory of ~16k train and ~2k val tokens (see _patterned_docs) for the micro model."""
    path = tmp_path_factory.mktemp("tiny_data")
    return write_micro_dataset(path, _patterned_docs(400, seed=0), _patterned_docs(50, seed=1))


def save_model(model: Axiom, cfg: Config, directory: str | Path, **progress) -> None:
    """Write `model`'s weights and config.json into `directory` (which must exist), as a checkpoint;
    `progress`: step, tokens, ...."""
    save_weights(model.state_dict(), cfg, directory, **progress)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a csv the run writes (train.csv, eval.csv, events.csv), as strings by column."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def count_params(model: torch.nn.Module, non_embedding: bool = False) -> int:
    """Parameters of a built model, a tied table once; `non_embedding` leaves out the token table."""
    n = sum(p.numel() for p in model.parameters())
    return n - model.embed.weight.numel() if non_embedding else n


def when_the_reader_leaves(cmd: list, after: int, env: dict | None = None) -> tuple[int, str, bytes]:
    """(exit status, stderr, the bytes read) of `cmd` whose reader goes away after `after` bytes, as in
    `cmd | head -c N`. A run that wrote all its output into the pipe before the reader left (this process
    descheduled meanwhile on a loaded machine) exits 0 and is run again, up to twice: only a run that met the closed
    pipe tells."""
    for _ in range(3):
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as piped:
            head = piped.stdout.read(after)
            piped.stdout.close()
            status, err = piped.wait(timeout=120), piped.stderr.read().decode()
        if status != 0:
            break
    return status, err, head


def signalled_train_step(at_call: int, signum: int) -> Callable:
    """The trainer's train_step, raising `signum` in this process during its `at_call`-th call, as a kill would
    arrive mid-step (the run stops at that step's end)."""
    import axiom.train.trainer as trainer_mod

    real_step, calls = trainer_mod.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            signal.raise_signal(signum)
        return real_step(*args, **kwargs)

    return step
