"""Test data without `axiom prepare`: a prepared directory written straight from documents in memory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

from axiom.data.loader import FORMAT_VERSION, MANIFEST, TOKEN_DTYPE, shard_name
from axiom.errors import AxiomError
from axiom.files import write_json_atomic
from axiom.text.tokenizer import EOS_ID, NAME, SHA256, load_tokenizer


def write_dataset(
    data_dir: str | Path,
    train: Sequence[Sequence[int] | str],
    val: Sequence[Sequence[int] | str] = (),
    shard_tokens: int = 1 << 20,
) -> dict:
    """Write a small prepared directory from in-memory documents (token id lists or text); returns the manifest.

    The same files `axiom prepare` writes, without its sources or split hash.
    Text is encoded with cl100k_base; EOS follows every document.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    enc = load_tokenizer()
    manifest: dict = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": NAME, "sha256": SHA256},
        "eos_id": EOS_ID,
        "split": {"val_fraction": None, "split_seed": None, "formula": "given by the caller (write_dataset)"},
        "shard_tokens": shard_tokens,
        "shards": [],
        "skipped_empty_docs": 0,
        "sources": [],
    }
    for split, docs in (("train", train), ("val", val)):
        ids, nbytes = [], 0
        for doc in docs:
            tokens = enc.encode_ordinary(doc) if isinstance(doc, str) else list(doc)
            nbytes += len(doc.encode("utf-8")) if isinstance(doc, str) else len(enc.decode_bytes(tokens))
            ids.extend([*tokens, EOS_ID])
        stream = np.asarray(ids, dtype=TOKEN_DTYPE)
        for index, lo in enumerate(range(0, len(stream), shard_tokens)):
            chunk = stream[lo : lo + shard_tokens]
            name = shard_name(split, index)
            tmp = data_dir / (name + ".tmp")
            chunk.tofile(tmp)
            os.replace(tmp, data_dir / name)
            docs_in = int(np.count_nonzero(chunk == EOS_ID))
            manifest["shards"].append({"file": name, "split": split, "tokens": len(chunk), "docs": docs_in})
        manifest[f"{split}_tokens"] = len(stream)
        manifest[f"{split}_docs"] = len(docs)
        manifest[f"{split}_bytes"] = nbytes
    write_json_atomic(data_dir / MANIFEST, manifest)
    return manifest


def held_under(folder: str | Path) -> list[str]:
    """What this process holds open under `folder`: its mapped files and file descriptors (Linux /proc)."""
    inside = str(Path(folder).resolve()) + os.sep
    lines = Path("/proc/self/maps").read_text().splitlines()
    held = {f"map {line.split(maxsplit=5)[5]}" for line in lines if inside in line}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used is gone
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(inside):
                held.add(f"fd {target}")
    return sorted(held)


def fails_holding_nothing(folder: str | Path, kept: list, match: str, call: Callable[[], object]) -> None:
    """`call()` raises an AxiomError matching `match`, which is kept in `kept` (as a notebook or a server keeps the
    last error, and with its traceback the frames that held a reader), and nothing under `folder` is held open."""
    with pytest.raises(AxiomError, match=match) as caught:
        call()
    kept.append(caught.value)
    assert held_under(folder) == [], caught.value
