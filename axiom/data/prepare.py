"""Text corpora to tokenized shards (train/val) plus manifest.json, in parallel and restartable: what `axiom prepare`
(axiom/cli/prepare.py) runs.

Units of work (see axiom/data/sources.py) are tokenized by worker processes (axiom/data/workers.py) and their results
consumed in unit order, so the token stream of each split, and thus every shard boundary, is the same for any number of
workers. Shards are cut every `shard_tokens` tokens (documents may straddle two shards; the loader reads one stream).
After each unit, `prepare-state.json` records the completed shards and the length of the shard being written; a re-run
after an interruption truncates that shard to the recorded length and continues with the next unit. The state also lists
every shard file prepare created (`Ledger`): only those are ever truncated or deleted. `--out` is locked while prepare
runs, must not overlap an input, and must be new, empty or prepare's own output (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from axiom.data import chat as chat_data
from axiom.data import sources
from axiom.data.loader import (
    FORMAT_VERSION,
    MANIFEST,
    MASK_DTYPE,
    SPLITS,
    TOKEN_DTYPE,
    mask_name,
    shard_name,
    size_mismatch,
)
from axiom.data.sources import SPLIT_FORMULA, Unit, UnitResult
from axiom.data.workers import WorkerDied, results_in_order
from axiom.errors import AxiomError
from axiom.files import (
    check_no_overlap,
    describe_missing,
    member,
    output_lock,
    read_json,
    remove_stale_temps,
    write_errors,
    write_json_atomic,
)
from axiom.text.tokenizer import EOS_ID, NAME, SHA256

STATE = "prepare-state.json"
SHARD_FILE = re.compile(r"^(train|val)_(\d{5,})\.(bin|mask)(\.tmp)?$")
# what a killed prepare may leave in --out beside its shards: the temporaries of write_json_atomic
OWN_TEMP = re.compile(rf"^\.({re.escape(STATE)}|{re.escape(MANIFEST)})\.tmp-\d+$")


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class RunStats:
    """What this run tokenized (not the earlier runs it continues), for the command's throughput line."""

    workers: int
    elapsed: float = 0.0  # seconds spent tokenizing and writing
    text_bytes: int = 0
    tokens: int = 0


class Progress:
    """What a prepare run has to say as it goes, for the command to show; this base class shows nothing."""

    def already_prepared(self, out: Path) -> None:
        """`out` is already prepared with these settings: nothing to do."""

    def started(self, total_bytes: int, done_bytes: int) -> None:
        """Tokenizing begins; `done_bytes` of the inputs' estimated `total_bytes` were done by an earlier run."""

    def advanced(self, unit_bytes: int, docs: int) -> None:
        """One more unit of `unit_bytes` is saved; `docs` documents are written in all."""

    def stopped(self, units_done: int, units: int) -> None:
        """Interrupted (Ctrl-C) after `units_done` of `units` units: the same command continues from there."""

    def ended(self) -> None:
        """Tokenizing is over, done or not."""

    def finished(self, out: Path, manifest: dict, run: RunStats) -> None:
        """`out` is prepared: its manifest is written."""


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
    until the caller has saved the state, then `rename_pending` gives them their final names. `claim(name)` is
    called before a shard file is created, so that the saved state lists it first (see `Ledger`). With `masked`
    (chat data), each shard has a loss mask beside it, `SPLIT_NNNNN.mask`, one byte per token, cut alike.
    """

    def __init__(
        self, out: Path, split: str, shard_tokens: int, state: dict, claim: Callable[[str], None], masked: bool
    ) -> None:
        self.out, self.split, self.shard_tokens, self.state, self.claim = out, split, shard_tokens, state, claim
        self.masked = masked
        self.file = self.mask_file = None
        self.pending: list[str] = []

    def current(self) -> str:
        return shard_name(self.split, len(self.state["shards"]))

    def write(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> None:
        st = self.state
        while len(tokens):
            if self.file is None:
                self.claim(self.current())
                self.file = open(self.out / (self.current() + ".tmp"), "ab")  # noqa: SIM115 (open across units)
                if self.masked:
                    self.claim(mask_name(self.current()))
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
        self.close_files()
        if st["partial_tokens"]:
            name = self.current()
            st["shards"].append({"file": name, "tokens": st["partial_tokens"], "docs": st["partial_docs"]})
            self.pending.append(name)
            st["partial_tokens"] = st["partial_docs"] = 0

    def close_files(self) -> None:
        for f in (self.file, self.mask_file):
            if f is not None:
                f.close()
        self.file = self.mask_file = None

    def flush(self) -> None:
        for f in (self.file, self.mask_file):
            if f is not None:
                f.flush()

    def rename_pending(self) -> None:
        for name in self.pending:
            for file in (name, mask_name(name)) if self.masked else (name,):
                os.replace(self.out / (file + ".tmp"), self.out / file)
        self.pending.clear()


class Ledger:
    """prepare-state.json: the recovery point and the list of every shard file this prepare created in `out`.

    The state is saved after each unit. A shard file is `claim`ed (its name added to `state["created"]` and the
    last saved state written again with it) before it is created, so after any kill every shard-named file in
    `out` is either listed (ours: may be truncated or deleted) or foreign (never touched: prepare refuses)."""

    def __init__(self, out: Path, state: dict) -> None:
        self.out, self.state = out, state
        self.saved = json.dumps(state)

    def save(self) -> None:
        write_json_atomic(self.out / STATE, self.state)
        self.saved = json.dumps(self.state)

    def claim(self, name: str) -> None:
        if name in self.state["created"]:
            return
        self.state["created"].append(name)
        write_json_atomic(self.out / STATE, {**json.loads(self.saved), "created": self.state["created"]})


def created_files(state: dict) -> list[str]:
    """The shard names a state says this prepare created (states written before `created` existed: its shards and
    the shard in progress)."""
    if "created" in state:
        return list(state["created"])
    names = [sh["file"] for st in state["splits"].values() for sh in st["shards"]]
    return names + [shard_name(split, len(st["shards"])) for split, st in state["splits"].items()]


def check_state_names(state: dict, path: Path) -> None:
    """Every file a saved state names is a shard's, in its folder: restoring the state deletes and truncates them,
    so a name such as ../notes.txt or /home/x (a state edited by hand or by another program) is refused."""
    try:
        names = [*state["created"], *(sh["file"] for st in state["splits"].values() for sh in st["shards"])]
    except (KeyError, TypeError, AttributeError) as e:
        raise AxiomError(
            f"{path}: not a prepare state ({type(e).__name__}: {e}); delete {path.parent} and run this command again"
        ) from None
    for name in names:
        if not (isinstance(name, str) and SHARD_FILE.match(name) and not name.endswith(".tmp")):
            raise AxiomError(
                f"{path}: {name!r} is not a shard's name, and prepare deletes the files its state names; delete "
                f"{path.parent} and run this command again"
            )


def check_out_is_ours(out: Path) -> None:
    """An existing `out` must be empty or prepare's own earlier output (its state or manifest is there), so that
    shards never land beside a training run, a checkpoint or anyone's files. Shard-named files are left to
    `check_no_foreign_shards`, which names them."""
    if not out.is_dir() or (out / STATE).is_file() or (out / MANIFEST).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if not (SHARD_FILE.match(p.name) or OWN_TEMP.match(p.name)))
    if foreign:
        named = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise AxiomError(
            f"--out {out} holds {named}, which axiom prepare did not write; prepare writes only into a new or empty "
            "folder, or continues its own output there: choose another --out"
        )


def check_no_foreign_shards(out: Path, owned: set[str]) -> None:
    """Refuse to work in a folder holding shard-named files that this prepare did not create: they are not ours
    to truncate, replace or delete."""
    for p in sorted(out.iterdir()):
        if SHARD_FILE.match(p.name) and p.name.removesuffix(".tmp") not in owned:
            source = f"not listed in {out / STATE}" if (out / STATE).exists() else "it was there before"
            raise AxiomError(
                f"{p}: a file with a shard's name that this prepare did not write ({source}); it is left alone: "
                "move it away or choose another --out"
            )


def shard_parts(settings: dict) -> list[tuple[Callable[[str], str], int]]:
    """(file name from a shard's name, bytes per token) of each file a shard has: its tokens, and for chat data
    its loss mask."""
    parts = [(lambda name: name, TOKEN_DTYPE.itemsize)]
    if settings.get("kind") == "chat":
        parts.append((mask_name, MASK_DTYPE.itemsize))
    return parts


def restore(out: Path, state: dict) -> None:
    """Make the files agree with a saved state after an interruption: finish renames, cut off unrecorded tokens,
    and remove the shard files this prepare created after the last save (and only those)."""
    keep = set()
    for split in SPLITS:
        st = state["splits"][split]
        for shard in st["shards"]:
            for name_of, itemsize in shard_parts(state["settings"]):
                final, tmp = out / name_of(shard["file"]), out / (name_of(shard["file"]) + ".tmp")
                size = shard["tokens"] * itemsize
                if tmp.is_file() and tmp.stat().st_size == size:
                    os.replace(tmp, final)
                if not (final.is_file() and final.stat().st_size == size):
                    raise AxiomError(
                        f"{final}: missing or wrong size for the saved state in {out / STATE}; delete {out} and "
                        "run this command again"
                    )
                keep.add(final.name)
        for name_of, itemsize in shard_parts(state["settings"]):
            partial = name_of(shard_name(split, len(st["shards"]))) + ".tmp"
            size = st["partial_tokens"] * itemsize
            if size:
                tmp = out / partial
                if not tmp.is_file() or tmp.stat().st_size < size:
                    raise AxiomError(
                        f"{tmp}: shorter than the saved state in {out / STATE} records; delete {out} and run this "
                        "command again"
                    )
                os.truncate(tmp, size)
                keep.add(partial)
    for name in created_files(state):
        for p in (out / name, out / (name + ".tmp")):
            if p.name not in keep:
                p.unlink(missing_ok=True)


def remove_outputs(out: Path, state: dict, made_out: bool) -> None:
    """After bad input: remove every file this prepare created (shards, state), and `out` itself if it made it,
    so nothing is left that looks like (part of) a prepared directory."""
    for name in created_files(state):
        (out / name).unlink(missing_ok=True)
        (out / (name + ".tmp")).unlink(missing_ok=True)
    (out / STATE).unlink(missing_ok=True)
    if made_out:
        with contextlib.suppress(OSError):  # only when empty: anything else in it is not ours
            out.rmdir()


def check_shards(out: Path, manifest: dict) -> None:
    """A finished directory must still hold every shard at the size its manifest records."""
    for shard in manifest.get("shards", []):
        for name_of, itemsize in shard_parts(manifest):
            path = member(out, name_of(shard.get("file")), f"{out / MANIFEST}: shards[].file")
            expected = shard.get("tokens", 0) * itemsize
            if found := size_mismatch(path, expected):
                raise AxiomError(
                    f"{path}: {found}, but {out / MANIFEST} records {expected:,} bytes: this prepared directory is "
                    f"damaged; delete {out} and run this command again"
                )


def prepare(
    inputs: list[str],
    out: str | Path,
    workers: int | None = None,
    val_fraction: float = 0.001,
    split_seed: int = 1337,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    allow_empty_split: bool = False,
    chat: dict | None = None,
    progress: Progress | None = None,
) -> dict:
    """Tokenize `inputs` into `out`; returns the manifest. Resumes an interrupted run with the same settings.

    `out` is locked for the duration; it must not overlap an input; an existing `out` must be empty or hold this
    prepare's state or manifest, and shard-named files in it that this prepare did not create make it refuse.
    `val_fraction` 0 or 1 (an empty split) needs `allow_empty_split`. `chat` (from `chat.chat_settings`): the inputs
    are conversations, written with a loss mask (docs/finetuning.md). `progress` hears how the run goes (the command
    shows it)."""
    workers = default_workers() if workers is None else workers
    progress = progress or Progress()
    if workers < 1 or shard_tokens < 1 or not 0.0 <= val_fraction <= 1.0:
        raise AxiomError(
            f"prepare: need --workers >= 1, --shard-tokens >= 1 and 0 <= --val-fraction <= 1, got {workers}, "
            f"{shard_tokens}, {val_fraction}"
        )
    if val_fraction in (0.0, 1.0) and not allow_empty_split:
        empty = "val" if val_fraction == 0.0 else "train"
        raise AxiomError(
            f"--val-fraction {val_fraction:g} leaves the {empty} split empty, and axiom train needs both; pass "
            "--allow-empty-split for a train-only or eval-only corpus"
        )
    out = Path(out)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise AxiomError(f"--out {out}: {describe_missing(out)}, not a folder; choose another --out")
    files = sources.resolve_inputs(inputs)
    dirs = [Path(i) for i in inputs if not i.startswith("hf:") and Path(i).is_dir()]
    check_no_overlap(out, [("the input", p) for p in dirs + files])
    units = chat_data.plan_chat_units(files) if chat else sources.plan_units(files, text_field)
    settings = settings_for(files, val_fraction, split_seed, text_field, shard_tokens, chat)
    kept = f"the work recorded in {out / STATE} is kept; fix that, then run the same command again to continue"
    with write_errors(out, "nothing was written"), output_lock(out, "prepare"):
        check_out_is_ours(out)
        if (out / MANIFEST).is_file():
            manifest = read_json(out / MANIFEST, f"use another --out or delete {out}")
            check_same_settings(manifest, settings, out / MANIFEST)
            check_shards(out, manifest)
            (out / STATE).unlink(missing_ok=True)  # a kill after the manifest's rename can leave it
            progress.already_prepared(out)
            return manifest
        made_out = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        for name in (STATE, MANIFEST):
            remove_stale_temps(out / name)
        with write_errors(out, kept):
            state = load_state(out, settings)
            stats = write_units(out, state, units, workers, made_out, progress)
            manifest = finish(inputs, out, state, len(units), made_out)
            progress.finished(out, manifest, stats)
            return manifest


def load_state(out: Path, settings: dict) -> dict:
    """The saved state of an interrupted run with the same settings, its files made to agree with it; or a new one."""
    if (out / STATE).is_file():
        state = read_json(out / STATE, f"use another --out or delete {out}")
        check_same_settings(state.get("settings", {}), settings, out / STATE)
        state["created"] = created_files(state)
        check_state_names(state, out / STATE)
    else:
        state = {
            "settings": settings,
            "units_done": 0,
            "skipped_empty_docs": 0,
            **({"chat": chat_data.new_chat_counts()} if settings.get("chat") else {}),
            "created": [],
            "splits": {
                s: {"shards": [], "partial_tokens": 0, "partial_docs": 0, "tokens": 0, "docs": 0, "bytes": 0}
                for s in SPLITS
            },
        }
    check_no_foreign_shards(out, set(state["created"]))
    restore(out, state)
    return state


def unit_work(settings: dict) -> tuple[Callable, tuple]:
    """The function that tokenizes one unit in a worker, and its arguments after the unit."""
    split, chat = settings["split"], settings.get("chat")
    if chat:
        job = (split["val_fraction"], split["split_seed"], chat["seq_len"], chat["overflow"])
        return chat_data.tokenize_chat_unit, job
    return sources.tokenize_unit, (settings["text_field"], split["val_fraction"], split["split_seed"])


def write_units(
    out: Path, state: dict, units: list[Unit], workers: int, made_out: bool, progress: Progress
) -> RunStats:
    """Tokenize the units not done yet and append them to the shards, saving the state after each unit."""
    settings = state["settings"]
    chat = bool(settings.get("chat"))
    ledger = Ledger(out, state)
    writers = {s: SplitWriter(out, s, settings["shard_tokens"], state["splits"][s], ledger.claim, chat) for s in SPLITS}
    done = state["units_done"]
    progress.started(sum(u.est_bytes for u in units), sum(u.est_bytes for u in units[:done]))
    stats, start_time = RunStats(workers), time.perf_counter()
    try:
        for result in results_in_order(units[done:], workers, *unit_work(settings)):
            add_unit(state, writers, result, stats)
            if state["units_done"] == len(units):
                for w in writers.values():
                    w.close_shard()  # the last, shorter shard of each split
            ledger.save()  # the recovery point: only then do shards get final names
            for w in writers.values():
                w.rename_pending()
            progress.advanced(result.est_bytes, sum(state["splits"][s]["docs"] for s in SPLITS))
    except WorkerDied:
        raise  # the units done are recorded: the same command continues
    except AxiomError:
        for w in writers.values():
            w.close_shard()
        remove_outputs(out, state, made_out)
        raise
    except KeyboardInterrupt:
        progress.stopped(state["units_done"], len(units))
        raise
    finally:
        progress.ended()
        for w in writers.values():
            w.close_files()
    stats.elapsed = time.perf_counter() - start_time
    return stats


def add_unit(state: dict, writers: dict[str, SplitWriter], result: UnitResult, stats: RunStats) -> None:
    """One unit's tokens (and loss masks) appended to each split, counted in the state and the run's stats."""
    chat = bool(state["settings"].get("chat"))
    if chat:
        chat_data.count_chat(state["chat"], result)
    for s in SPLITS:
        st = state["splits"][s]
        if chat:
            writers[s].write(result.tokens[s], result.masks[s])
        else:
            writers[s].write(result.tokens[s])
        writers[s].flush()
        st["tokens"] += len(result.tokens[s])
        st["docs"] += result.docs[s]
        st["bytes"] += result.text_bytes[s]
        stats.text_bytes += result.text_bytes[s]
        stats.tokens += len(result.tokens[s])
    state["skipped_empty_docs"] += result.skipped_empty
    state["units_done"] += 1


def finish(inputs: list[str], out: Path, state: dict, units: int, made_out: bool) -> dict:
    """Write the manifest of a completed state and remove the state file; no documents at all is an error."""
    settings, totals = state["settings"], {s: state["splits"][s] for s in SPLITS}
    chat = settings.get("chat")
    if not totals["train"]["docs"] and not totals["val"]["docs"]:
        remove_outputs(out, state, made_out)
        too_long = f", {state['chat']['skipped_long']} longer than --seq-len" if chat else ""
        raise AxiomError(
            f"no documents in {' '.join(inputs)} ({state['skipped_empty_docs']} empty{too_long} skipped); "
            "check the inputs"
        )
    manifest = {
        **settings,
        "shards": [{**sh, "split": s} for s in SPLITS for sh in totals[s]["shards"]],
        "skipped_empty_docs": state["skipped_empty_docs"],
        "units": units,
        **(chat_data.chat_totals(state["chat"]) if chat else {}),
    }
    for s in SPLITS:
        manifest[f"{s}_tokens"] = totals[s]["tokens"]
        manifest[f"{s}_docs"] = totals[s]["docs"]
        manifest[f"{s}_bytes"] = totals[s]["bytes"]
    write_json_atomic(out / MANIFEST, manifest)
    (out / STATE).unlink()
    return manifest
