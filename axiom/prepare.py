"""`axiom prepare`: text corpora to tokenized shards (train/val) plus manifest.json, in parallel and restartable.

Units of work (see axiom/sources.py) are tokenized by a process pool and their results consumed in unit order, so
the token stream of each split, and thus every shard boundary, is the same for any number of workers. Shards are
cut every `shard_tokens` tokens (documents may straddle two shards; the loader reads one stream). After each unit,
`prepare-state.json` records the completed shards and the length of the shard being written; a re-run after an
interruption truncates that shard to the recorded length and continues with the next unit.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from axiom import chat as chat_data
from axiom import sources
from axiom.config import TrainConfig
from axiom.errors import AxiomError
from axiom.files import read_json, write_json_atomic
from axiom.loader import FORMAT_VERSION, MANIFEST, MASK_DTYPE, SPLITS, TOKEN_DTYPE, mask_name, shard_name
from axiom.sources import SPLIT_FORMULA, Unit, UnitResult
from axiom.tokenizer import EOS_ID, NAME, SHA256

STATE = "prepare-state.json"
SHARD_FILE = re.compile(r"^(train|val)_(\d{5,})\.(bin|mask)(\.tmp)?$")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="file, directory or glob of .parquet/.jsonl/.jsonl.gz/.jsonl.zst/.txt, or hf:OWNER/DATASET[:FOLDER]",
    )
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes (default: all)")
    card = TrainConfig()  # the split settings of the card's run
    parser.add_argument(
        "--val-fraction", type=float, default=card.val_fraction, help="val share of documents (default: %(default)s)"
    )
    parser.add_argument(
        "--split-seed", type=int, default=card.split_seed, help="salt of the split hash (default: %(default)s)"
    )
    parser.add_argument(
        "--text-field", default="text", help="parquet column / JSON field holding the text (default: %(default)s)"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (4 bytes each; default 100M)"
    )
    chat = parser.add_argument_group("chat data (docs/finetuning.md)")
    chat.add_argument(
        "--chat",
        action="store_true",
        help="rows are conversations ('messages' or ShareGPT 'conversations'): ChatML ids plus a loss mask",
    )
    chat.add_argument(
        "--seq-len",
        type=int,
        default=card.seq_len,
        help="--chat: longest conversation in tokens, EOS included (default: the card's context, %(default)s)",
    )
    chat.add_argument(
        "--overflow",
        choices=chat_data.OVERFLOW,
        default="truncate",
        help="--chat: a longer conversation keeps its longest prefix ending with an assistant turn (truncate, "
        "the default) or is skipped (skip); both are counted in the manifest",
    )


def run(args: argparse.Namespace) -> None:
    prepare(
        args.inputs,
        args.out,
        workers=args.workers,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        text_field=args.text_field,
        shard_tokens=args.shard_tokens,
        chat=chat_data.chat_settings(args.seq_len, args.overflow) if args.chat else None,
    )


def settings_for(
    files: list[Path], val_fraction: float, split_seed: int, text_field: str, shard_tokens: int, chat: dict | None
) -> dict:
    """Everything the output depends on; a directory prepared with other settings is never mixed with these."""
    return {
        "kind": "chat" if chat else "text",
        **({"chat": chat} if chat else {}),
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": NAME, "sha256": SHA256},
        "eos_id": EOS_ID,
        "split": {"val_fraction": val_fraction, "split_seed": split_seed, "formula": SPLIT_FORMULA},
        "text_field": text_field,
        "shard_tokens": shard_tokens,
        "sources": [sources.source_info(f) for f in files],
    }


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_settings(found: dict, settings: dict, path: Path) -> None:
    before = flat({k: found.get(k, "text" if k == "kind" else None) for k in settings})  # no kind: text
    now = flat(settings)
    changed = sorted(k for k in now.keys() | before.keys() if before.get(k) != now.get(k))
    if changed:
        detail = ", ".join(
            "source files (path, size or mtime)" if k == "sources" else f"{k} {before.get(k)} -> {now.get(k)}"
            for k in changed
        )
        raise AxiomError(
            f"{path} was made with different settings ({detail}); use another --out or delete {path.parent}"
        )


class SplitWriter:
    """Appends one split's tokens to `SPLIT_NNNNN.bin.tmp`, cutting a shard every `shard_tokens` tokens.

    `state` ({"shards", "partial_tokens", "partial_docs"}) is updated in place; completed shards wait in `pending`
    until the caller has saved the state, then `rename_pending` gives them their final names. With `masked`
    (chat data), each shard has a loss mask beside it, `SPLIT_NNNNN.mask`, one byte per token, cut alike.
    """

    def __init__(self, out: Path, split: str, shard_tokens: int, state: dict, masked: bool = False) -> None:
        self.out, self.split, self.shard_tokens, self.state = out, split, shard_tokens, state
        self.masked = masked
        self.file = self.mask_file = None
        self.pending: list[str] = []

    def current(self) -> str:
        return shard_name(self.split, len(self.state["shards"]))

    def write(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        st = self.state
        while len(tokens):
            if self.file is None:
                self.file = open(self.out / (self.current() + ".tmp"), "ab")  # noqa: SIM115 (open across units)
                if self.masked:
                    self.mask_file = open(self.out / (mask_name(self.current()) + ".tmp"), "ab")  # noqa: SIM115
            piece = tokens[: self.shard_tokens - st["partial_tokens"]]
            self.file.write(piece.tobytes())
            if self.mask_file is not None:
                self.mask_file.write(mask[: len(piece)].tobytes())
                mask = mask[len(piece) :]
            st["partial_tokens"] += len(piece)
            st["partial_docs"] += int(np.count_nonzero(piece == EOS_ID))
            tokens = tokens[len(piece) :]
            if st["partial_tokens"] == self.shard_tokens:
                self.close_shard()

    def close_shard(self) -> None:
        st = self.state
        for f in (self.file, self.mask_file):
            if f is not None:
                f.close()
        self.file = self.mask_file = None
        if st["partial_tokens"]:
            name = self.current()
            st["shards"].append({"file": name, "tokens": st["partial_tokens"], "docs": st["partial_docs"]})
            self.pending.append(name)
            st["partial_tokens"] = st["partial_docs"] = 0

    def flush(self) -> None:
        for f in (self.file, self.mask_file):
            if f is not None:
                f.flush()

    def rename_pending(self) -> None:
        for name in self.pending:
            for file in (name, mask_name(name)) if self.masked else (name,):
                os.replace(self.out / (file + ".tmp"), self.out / file)
        self.pending.clear()


def restore(out: Path, state: dict) -> None:
    """Make the files agree with a saved state after an interruption: finish renames, cut off unrecorded tokens,
    and remove shards written after the last save."""
    keep = set()
    # (file name of a shard, bytes per token): the token file, and for chat data its mask
    parts = [(lambda n: n, TOKEN_DTYPE.itemsize)]
    if state["settings"].get("kind", "text") == "chat":
        parts.append((mask_name, MASK_DTYPE.itemsize))
    for split in SPLITS:
        st = state["splits"][split]
        for shard in st["shards"]:
            for name_of, itemsize in parts:
                final, tmp = out / name_of(shard["file"]), out / (name_of(shard["file"]) + ".tmp")
                size = shard["tokens"] * itemsize
                if tmp.is_file() and tmp.stat().st_size == size:
                    os.replace(tmp, final)
                if not (final.is_file() and final.stat().st_size == size):
                    raise AxiomError(
                        f"{final}: missing or wrong size for the saved state in {out / STATE}; delete {out}"
                    )
                keep.add(final.name)
        for name_of, itemsize in parts:
            partial = name_of(shard_name(split, len(st["shards"]))) + ".tmp"
            size = st["partial_tokens"] * itemsize
            if size:
                tmp = out / partial
                if not tmp.is_file() or tmp.stat().st_size < size:
                    raise AxiomError(f"{tmp}: shorter than the saved state in {out / STATE} records; delete {out}")
                os.truncate(tmp, size)
                keep.add(partial)
    for p in out.iterdir():
        if SHARD_FILE.match(p.name) and p.name not in keep:
            p.unlink()


def remove_outputs(out: Path) -> None:
    """After bad input: leave nothing behind that looks like (part of) a prepared directory."""
    for p in out.iterdir():
        if SHARD_FILE.match(p.name) or p.name in (STATE, STATE + ".tmp"):
            p.unlink()


def results_in_order(units: list[Unit], workers: int, work: Callable, job: tuple) -> Iterator[UnitResult]:
    """`work(unit, *job)` for each unit, in unit order, with at most 2 * workers units in flight (bounded memory)."""
    if workers == 1:
        for unit in units:
            yield work(unit, *job)
        return
    # spawn: workers import only axiom.sources (no torch), and no forked copy of the parent's threads
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        todo: Iterable[Unit] = iter(units)
        flight: deque = deque()
        for unit in todo:
            flight.append(pool.apply_async(work, (unit, *job)))
            if len(flight) >= 2 * workers:
                yield flight.popleft().get()
        while flight:
            yield flight.popleft().get()


def prepare(
    inputs: list[str],
    out: str | Path,
    workers: int | None = None,
    val_fraction: float = 0.001,
    split_seed: int = 1337,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    quiet: bool = False,
    chat: dict | None = None,
) -> dict:
    """Tokenize `inputs` into `out`; returns the manifest. Resumes an interrupted run with the same settings.
    `chat` (from `chat_settings`): the inputs are conversations, written with a loss mask (docs/finetuning.md)."""
    workers = default_workers() if workers is None else workers
    if workers < 1 or shard_tokens < 1 or not 0.0 <= val_fraction <= 1.0:
        raise AxiomError(
            f"prepare: need --workers >= 1, --shard-tokens >= 1 and 0 <= --val-fraction <= 1, got {workers}, "
            f"{shard_tokens}, {val_fraction}"
        )
    out = Path(out)
    files = sources.resolve_inputs(inputs)
    units = chat_data.plan_chat_units(files) if chat else sources.plan_units(files, text_field)
    settings = settings_for(files, val_fraction, split_seed, text_field, shard_tokens, chat)
    if chat:
        work, job = chat_data.tokenize_chat_unit, (val_fraction, split_seed, chat["seq_len"], chat["overflow"])
    else:
        work, job = sources.tokenize_unit, (text_field, val_fraction, split_seed)

    if (out / MANIFEST).is_file():
        manifest = read_json(out / MANIFEST, f"use another --out or delete {out}")
        check_same_settings(manifest, settings, out / MANIFEST)
        if not quiet:
            print(f"{out} is already prepared with these settings: nothing to do")
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    if (out / STATE).is_file():
        state = read_json(out / STATE, f"use another --out or delete {out}")
        check_same_settings(state.get("settings", {}), settings, out / STATE)
        restore(out, state)
    else:
        state = {
            "settings": settings,
            "units_done": 0,
            "skipped_empty_docs": 0,
            **({"chat": chat_data.new_chat_counts()} if chat else {}),
            "splits": {
                s: {"shards": [], "partial_tokens": 0, "partial_docs": 0, "tokens": 0, "docs": 0, "bytes": 0}
                for s in SPLITS
            },
        }
        restore(out, state)  # clears stray shards of an unrecorded earlier attempt
    writers = {s: SplitWriter(out, s, shard_tokens, state["splits"][s], masked=bool(chat)) for s in SPLITS}

    done = state["units_done"]
    bar = tqdm(
        total=sum(u.est_bytes for u in units),
        initial=sum(u.est_bytes for u in units[:done]),
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        desc="prepare",
        disable=quiet,
        dynamic_ncols=True,
    )
    start_time, text_bytes, run_tokens = time.perf_counter(), 0, 0
    try:
        for result in results_in_order(units[done:], workers, work, job):
            if chat:
                chat_data.count_chat(state["chat"], result)
            for split in SPLITS:
                st = state["splits"][split]
                writers[split].write(result.tokens[split], result.masks[split] if chat else None)
                writers[split].flush()
                st["tokens"] += len(result.tokens[split])
                st["docs"] += result.docs[split]
                st["bytes"] += result.text_bytes[split]
                text_bytes += result.text_bytes[split]
                run_tokens += len(result.tokens[split])
            state["skipped_empty_docs"] += result.skipped_empty
            state["units_done"] += 1
            if state["units_done"] == len(units):
                for w in writers.values():
                    w.close_shard()  # the last, shorter shard of each split
            write_json_atomic(out / STATE, state)  # the recovery point: only then do shards get final names
            for w in writers.values():
                w.rename_pending()
            bar.update(result.est_bytes)
            bar.set_postfix(docs=sum(state["splits"][s]["docs"] for s in SPLITS), refresh=False)
    except AxiomError:
        for w in writers.values():
            w.close_shard()
        remove_outputs(out)
        raise
    finally:
        bar.close()
        for w in writers.values():
            for f in (w.file, w.mask_file):
                if f is not None:
                    f.close()
    elapsed = time.perf_counter() - start_time

    totals = {s: state["splits"][s] for s in SPLITS}
    if not totals["train"]["docs"] and not totals["val"]["docs"]:
        remove_outputs(out)
        too_long = f", {state['chat']['skipped_long']} longer than --seq-len" if chat else ""
        raise AxiomError(
            f"no documents in {' '.join(inputs)} ({state['skipped_empty_docs']} empty{too_long} skipped); "
            "check the inputs"
        )
    manifest = {
        **settings,
        "shards": [{**sh, "split": s} for s in SPLITS for sh in totals[s]["shards"]],
        "skipped_empty_docs": state["skipped_empty_docs"],
        "units": len(units),
        **(chat_data.chat_totals(state["chat"]) if chat else {}),
    }
    for s in SPLITS:
        manifest[f"{s}_tokens"] = totals[s]["tokens"]
        manifest[f"{s}_docs"] = totals[s]["docs"]
        manifest[f"{s}_bytes"] = totals[s]["bytes"]
    write_json_atomic(out / MANIFEST, manifest)
    (out / STATE).unlink()
    if not quiet:
        report(out, manifest, elapsed, text_bytes, run_tokens, workers)
        if chat:
            chat_data.report_chat(manifest)
    return manifest


def report(out: Path, m: dict, elapsed: float, text_bytes: int, tokens: int, workers: int) -> None:
    print(f"prepared {out}: {len(m['sources'])} source files, {m['skipped_empty_docs']:,} empty documents skipped")
    for s in SPLITS:
        n = sum(1 for sh in m["shards"] if sh["split"] == s)
        print(f"  {s:<5} {m[f'{s}_docs']:>12,} docs {m[f'{s}_tokens']:>15,} tokens {n:>5} shards")
    print(
        f"  this run: {text_bytes / 1e6:,.1f} MB of text in {elapsed:.1f} s = {text_bytes / 1e6 / elapsed:.2f} MB/s "
        f"and {tokens / elapsed:,.0f} tokens/s with {workers} workers"
    )
