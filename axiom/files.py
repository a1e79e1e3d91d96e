"""File helpers shared by data, checkpoints and exports: JSON read with one-line errors, directories replaced
atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from axiom.errors import AxiomError


def read_json(path: Path, hint: str) -> dict:
    """The JSON object in `path`; invalid JSON or another JSON type is an AxiomError ending with `hint`."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AxiomError(f"{path}: not valid JSON ({e}); {hint}") from None
    if not isinstance(obj, dict):
        raise AxiomError(f"{path}: expected a JSON object; {hint}")
    return obj


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write JSON under a temporary name and rename, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Make the complete directory `tmp` visible as `final` in one rename, its files flushed to disk first.

    An old `final` is moved aside to `.NAME.old` and removed last, so a kill at any moment leaves one complete
    directory; `restore_dir` undoes a kill between the two renames."""
    for f in tmp.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = final.with_name(f".{final.name}.old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def restore_dir(final: Path) -> None:
    """Put back a directory that a kill left moved aside by `replace_dir`."""
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():
        os.replace(old, final)
