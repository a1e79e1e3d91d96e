"""Reading documents for `axiom prepare`: inputs to files, files to units of work, units to tokens.

A unit is a piece of one source that a worker reads on its own: a parquet row group, a byte range of a plain JSON
Lines file (cut at line ends), a whole compressed JSON Lines file, or a group of .txt files (one document each).
Units are planned from the inputs alone, so their order, and hence the token stream, never depends on the workers.
This module imports neither torch nor the loader, so worker processes start fast.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from axiom.errors import AxiomError, require
from axiom.files import describe_missing
from axiom.text.tokenizer import EOS_ID, load_tokenizer

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".txt")
JSONL_CHUNK_BYTES = 32 << 20  # plain JSON Lines are cut into ranges of about this size
TXT_GROUP_BYTES = 16 << 20  # .txt files are grouped into units of about this size
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time inside a row group, to bound memory
SPLIT_FORMULA = (
    'val iff int.from_bytes(blake2b(f"{split_seed}:".encode() + text.encode("utf-8"), digest_size=8).digest(), '
    '"big") / 2**64 < val_fraction'
)


def kind_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def resolve_inputs(inputs: list[str]) -> list[Path]:
    """Files named by INPUT arguments (file, directory searched recursively, glob or hf:OWNER/DATASET[:FOLDER]),
    deduplicated."""
    files: list[Path] = []
    for item in inputs:
        if item.startswith("hf:"):
            found = data_files(download_hf(item), item)
        elif Path(item).is_dir():
            found = data_files(Path(item), item)
        elif Path(item).is_file():
            if kind_of(Path(item)) is None:
                raise AxiomError(f"{item}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
            found = [Path(item)]
        elif glob.has_magic(item):
            matched = [Path(p) for p in sorted(glob.glob(item, recursive=True)) if kind_of(Path(p))]
            if not matched:
                raise AxiomError(f"{item}: the pattern matches no {', '.join(SUFFIXES)} files")
            found = [f for p in matched for f in (data_files(p, str(p)) if p.is_dir() else [p])]
        elif Path(item).exists() or Path(item).is_symlink():
            raise AxiomError(f"{item}: {describe_missing(Path(item))}; prepare reads regular files and folders")
        else:
            raise AxiomError(f"{item}: no such file or directory")
        for f in found:  # a pattern's matches as well: a FIFO would block the first read forever
            if not f.is_file():
                raise AxiomError(f"{f}: {describe_missing(f)}; prepare reads regular files and folders")
            if not os.access(f, os.R_OK):
                raise AxiomError(f"{f}: cannot read it (permission denied); nothing was written")
        files.extend(found)
    unique, seen = [], set()
    for f in files:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def data_files(directory: Path, label: str) -> list[Path]:
    found = sorted(p for p in directory.rglob("*") if p.is_file() and kind_of(p))
    if not found:
        raise AxiomError(f"{label}: no {', '.join(SUFFIXES)} files in {directory}")
    return found


def download_hf(source: str) -> Path:
    """Download `hf:REPO[:DIR]` (a dataset repo, optionally one folder of it) into the Hugging Face cache."""
    repo, _, subdir = source[3:].partition(":")
    if not repo:
        raise AxiomError(f"{source}: expected hf:OWNER/DATASET[:FOLDER], e.g. hf:HuggingFaceFW/fineweb-edu:sample/10BT")
    snapshot_download = require("huggingface_hub", source, "axiom-lm[hf]").snapshot_download
    prefix = f"{subdir.strip('/')}/" if subdir else ""
    patterns = [f"{prefix}*{s}" for s in SUFFIXES]  # fnmatch: * also crosses folders
    try:
        local = Path(snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=patterns))
    except Exception as e:  # any failure here means the files could not be fetched; say so in one line
        reason = " ".join(str(e).split())[:200]
        raise AxiomError(
            f"{source}: cannot download from the Hugging Face Hub ({type(e).__name__}: {reason}); check the "
            "network and HF_HUB_OFFLINE, or download the files elsewhere and pass their directory"
        ) from e
    return local / subdir if subdir else local


@dataclass(frozen=True)
class Unit:
    """One piece of work. `start`/`end`: row group index (parquet) or byte range (plain jsonl)."""

    kind: str
    paths: tuple[str, ...]
    start: int = 0
    end: int = 0
    est_bytes: int = 0  # text bytes it holds (estimated for parquet and compressed files), for the progress bar


def source_info(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def plan_units(files: list[Path], text_field: str) -> list[Unit]:
    """Units in a fixed order. Opens parquet metadata here, so bad files fail before any work starts."""
    units: list[Unit] = []
    txt: list[Path] = []

    def flush_txt() -> None:
        group, size = [], 0
        for i, p in enumerate(txt):
            group.append(str(p))
            size += p.stat().st_size
            if size >= TXT_GROUP_BYTES or i == len(txt) - 1:
                units.append(Unit(".txt", tuple(group), est_bytes=size))
                group, size = [], 0
        txt.clear()

    for path in files:
        kind = kind_of(path)
        if kind != ".txt":
            flush_txt()
        if kind == ".parquet":
            units.extend(plan_parquet(path, text_field))
        elif kind == ".jsonl":
            units.extend(plan_jsonl(path))
        elif kind in (".jsonl.gz", ".jsonl.zst"):
            units.append(Unit(kind, (str(path),), est_bytes=path.stat().st_size))
        else:
            txt.append(path)
    flush_txt()
    return units


def plan_parquet(path: Path, text_field: str) -> list[Unit]:
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as e:
        raise AxiomError(f"{path}: not a readable parquet file ({' '.join(str(e).split())[:160]})") from e
    if text_field not in schema.names:
        raise AxiomError(
            f"{path}: no column '{text_field}' (columns: {', '.join(schema.names)}); choose one with --text-field"
        )
    col_type = schema.field(text_field).type
    if pa.types.is_dictionary(col_type):  # dictionary-encoded strings (pandas' category dtype) read as strings
        col_type = col_type.value_type
    is_string_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16
    if not (pa.types.is_string(col_type) or pa.types.is_large_string(col_type) or is_string_view(col_type)):
        raise AxiomError(f"{path}: column '{text_field}' has type {col_type}, expected string text")
    return [
        Unit(".parquet", (str(path),), rg, rg + 1, column_bytes(meta, rg, text_field))
        for rg in range(meta.num_row_groups)
    ]


def column_bytes(meta: pq.FileMetaData, row_group: int, name: str) -> int:
    """The uncompressed bytes of top-level column `name` in a row group: the sum over its leaf columns (a list of
    structs has several), found by path; an arrow field's index is not a leaf column's where nesting comes first."""
    group = meta.row_group(row_group)
    leaves = (group.column(i) for i in range(group.num_columns))
    return sum(c.total_uncompressed_size for c in leaves if c.path_in_schema.split(".")[0] == name)


def plan_jsonl(path: Path) -> list[Unit]:
    """Byte ranges of about JSONL_CHUNK_BYTES, each ending just after a newline (or at the end of the file)."""
    size = path.stat().st_size
    bounds = [0]
    with open(path, "rb") as f:
        while bounds[-1] + JSONL_CHUNK_BYTES < size:
            f.seek(bounds[-1] + JSONL_CHUNK_BYTES)
            f.readline()
            bounds.append(min(f.tell(), size))
    if bounds[-1] < size or size == 0:
        bounds.append(size)
    return [Unit(".jsonl", (str(path),), a, b, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]


def read_unit(unit: Unit, text_field: str) -> Iterator[str | None]:
    """The documents of a unit, in order; None for a null text. Bad input raises AxiomError naming file and line."""
    if unit.kind == ".parquet":
        yield from read_parquet(unit, text_field)
    elif unit.kind == ".txt":
        for name in unit.paths:
            yield decode(Path(name).read_bytes(), name)
    else:
        yield from read_jsonl(unit, text_field)


def read_rows(unit: Unit, columns: tuple[str, ...] = ()) -> Iterator[tuple[object, Callable[[], str]]]:
    """Whole rows of a JSON Lines or parquet unit (of parquet, the `columns` it has), each with a function naming
    its place (`file:line`, `file: row N`) for an error message."""
    path = unit.paths[0]
    if unit.kind == ".jsonl":
        with open(path, "rb") as f:
            f.seek(unit.start)
            lines = io.BytesIO(f.read(unit.end - unit.start))  # at most JSONL_CHUNK_BYTES plus a line
        yield from parse_jsonl(lines, path, first_line=None, offset=unit.start)
        return
    if unit.kind != ".parquet":
        yield from parse_jsonl(compressed_lines(path, unit.kind), path, first_line=1, offset=0)
        return
    try:
        pf = pq.ParquetFile(path)
        first = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
        names = [c for c in columns if c in pf.schema_arrow.names]
        batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[unit.start], columns=names)
        for batch in batches:
            for row in batch.to_pylist():
                first += 1
                yield row, lambda n=first: f"{path}: row {n}"
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise AxiomError(
            f"{path}: row group {unit.start} is unreadable ({' '.join(str(e).split())[:160]}); the file is corrupt"
        ) from e


def read_parquet(unit: Unit, text_field: str) -> Iterator[str | None]:
    path = unit.paths[0]
    try:
        batches = pq.ParquetFile(path).iter_batches(
            batch_size=PARQUET_BATCH_ROWS, row_groups=[unit.start], columns=[text_field]
        )
        for batch in batches:
            yield from batch.column(0).to_pylist()
    except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
        raise AxiomError(
            f"{path}: row group {unit.start} is unreadable ({' '.join(str(e).split())[:160]}); the file is corrupt"
        ) from e


COMPRESSED_CHUNK = 1 << 20  # compressed bytes read at a time


def compressed_lines(path: str, kind: str) -> Iterator[bytes]:
    """The lines of a .jsonl.gz / .jsonl.zst file, verified complete: a stream that ends inside a gzip member or a
    zstd frame, a bad CRC or checksum, or a file that is not in that format is one AxiomError naming the file.
    The last line is yielded only after the end of the stream has been verified, so a file cut mid-line is
    reported as truncated, not as invalid JSON."""
    chunks = _gzip_chunks(path) if kind == ".jsonl.gz" else _zstd_chunks(path)
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _gzip_chunks(path: str) -> Iterator[bytes]:
    """Decompressed data of every gzip member; Python's gzip checks each member's CRC-32 and length trailer."""
    _not_empty(path)
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(COMPRESSED_CHUNK):
                yield chunk
    except EOFError:
        raise AxiomError(f"{path}: truncated (the gzip stream ends before its end marker); {REFETCH}") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise AxiomError(f"{path}: not a valid gzip file ({e}); {REFETCH}") from None


def _zstd_chunks(path: str) -> Iterator[bytes]:
    """Decompressed data of every zstd frame (a file may hold several); a frame's content checksum, when it has
    one, is checked by zstd. Python-zstandard's stream reader accepts a file cut between two blocks of a frame
    as complete, so frames are followed here and the file must end at a frame's end."""
    zstandard = require("zstandard", f"reading {path}", "zstandard")  # in no extra but dev
    _not_empty(path)
    dctx = zstandard.ZstdDecompressor()
    frame, inside = dctx.decompressobj(), False
    try:
        with open(path, "rb") as f:
            while data := f.read(COMPRESSED_CHUNK):
                while data:
                    inside = True
                    yield frame.decompress(data)
                    if not frame.eof:
                        break
                    data = frame.unused_data  # the start of the next frame, if any
                    frame, inside = dctx.decompressobj(), False
    except zstandard.ZstdError as e:
        raise AxiomError(f"{path}: not a valid zstd file ({e}); {REFETCH}") from None
    if inside:
        raise AxiomError(f"{path}: truncated (the file ends inside a zstd frame); {REFETCH}")


REFETCH = "download or compress it again (nothing was written)"


def _not_empty(path: str) -> None:
    """A compressed file of no bytes is a download cut off at once, not an empty corpus (the readers take it so)."""
    if os.path.getsize(path) == 0:
        raise AxiomError(f"{path}: truncated (empty: a compressed file holds at least a header); {REFETCH}")


def parse_jsonl(
    lines: Iterable[bytes], path: str, first_line: int | None, offset: int
) -> Iterator[tuple[object, Callable[[], str]]]:
    """Each non-blank line parsed. `first_line` None means: count lines before `offset` only on error."""

    def where(i: int) -> str:
        if first_line is not None:
            return f"{path}:{first_line + i}"
        before = 0
        with open(path, "rb") as f:  # an error is rare: count the lines before this range only now
            for _ in range(0, offset, 1 << 24):
                before += f.read(min(1 << 24, offset - f.tell())).count(b"\n")
        return f"{path}:{before + 1 + i}"

    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8-sig"))  # a file's byte-order mark is no part of its first line
        except UnicodeDecodeError as e:
            raise AxiomError(f"{where(i)}: invalid UTF-8 at byte {e.start} of the line; fix or remove it") from e
        except json.JSONDecodeError as e:
            raise AxiomError(f"{where(i)}: invalid JSON ({e.msg} at column {e.colno}); fix or remove it") from e
        except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting past Python's stack
            why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0][:120]
            raise AxiomError(f"{where(i)}: invalid JSON ({why}); fix or remove it") from None
        yield obj, functools.partial(where, i)


def read_jsonl(unit: Unit, text_field: str) -> Iterator[str | None]:
    """One document per non-blank line: the string (or null) in `text_field`."""
    for obj, where in read_rows(unit):
        if not isinstance(obj, dict) or text_field not in obj:
            fields = ", ".join(obj) if isinstance(obj, dict) else f"a JSON {type(obj).__name__}"
            raise AxiomError(f"{where()}: no field '{text_field}' (found: {fields}); choose one with --text-field")
        text = obj[text_field]
        if text is not None and not isinstance(text, str):
            raise AxiomError(f"{where()}: field '{text_field}' is {type(text).__name__}, expected a string")
        if text is not None and not is_valid_text(text):
            raise AxiomError(f"{where()}: field '{text_field}' holds a lone surrogate (not valid Unicode text)")
        yield text


def is_valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode(data: bytes, path: str) -> str:
    """A .txt file's text; its byte-order mark, if any, is no part of it."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise AxiomError(f"{path}:{line}: invalid UTF-8 (byte {e.start} of the file); fix or remove it") from e


def is_val(text_utf8: bytes, salt: bytes, val_fraction: float) -> bool:
    """The split rule (SPLIT_FORMULA): a hash of the text alone, so duplicates share a split."""
    h = int.from_bytes(hashlib.blake2b(salt + text_utf8, digest_size=8).digest(), "big")
    return h / 2**64 < val_fraction


@dataclass
class UnitResult:
    tokens: dict[str, np.ndarray]  # split -> uint32 ids, EOS after every document
    docs: dict[str, int]
    text_bytes: dict[str, int]  # UTF-8 bytes of document text, for bits per byte
    skipped_empty: int
    est_bytes: int


def tokenize_unit(unit: Unit, text_field: str, val_fraction: float, split_seed: int) -> UnitResult:
    """Read, split and tokenize one unit (runs in a worker process)."""
    enc = load_tokenizer()
    salt = f"{split_seed}:".encode()
    eos = np.array([EOS_ID], dtype=np.uint32)
    pieces: dict[str, list[np.ndarray]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    text_bytes = {"train": 0, "val": 0}
    skipped = 0
    for text in read_unit(unit, text_field):
        if not text:
            skipped += 1
            continue
        data = text.encode("utf-8")
        split = "val" if is_val(data, salt, val_fraction) else "train"
        # encode_ordinary's tokens (no special tokens recognised), straight into a uint32 buffer: no list of ints
        pieces[split] += [enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()), eos]
        docs[split] += 1
        text_bytes[split] += len(data)
    tokens = {
        s: np.concatenate(p).astype("<u4", copy=False) if p else np.empty(0, dtype="<u4") for s, p in pieces.items()
    }
    return UnitResult(tokens, docs, text_bytes, skipped, unit.est_bytes)
