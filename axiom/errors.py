"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import NoReturn


class AxiomError(Exception):
    """A user-facing error: bad input, config or file, with what to do about it."""


def require(module: str, what: str, install: str) -> ModuleType:
    """`module`, imported now for `what` (a command or option, as the user wrote it); where it or a package it
    imports is not installed, or it fails to import, one AxiomError naming `module` (and the package it lacks)
    instead. `install` is what pip should install: "axiom-lm[EXTRA]" for a package in one of pyproject.toml's
    extras, else the package itself (pip installs what an installed package lacks of its dependencies)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        itself = e.name is None or module == e.name or module.startswith(f"{e.name}.")
        raise _not_installed(module, what, install, dependency=None if itself else e.name) from None
    except ImportError as e:  # installed but broken (a C extension built for another Python or torch): say why
        raise AxiomError(
            f"{what} needs {module}, which is installed but does not import ({first_line(e)}): reinstall it"
        ) from None


def first_line(error: BaseException) -> str:
    """An error's first line, for a one-line message (torch's out-of-memory goes on with the allocator's statistics);
    its type's name where it has no message."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def require_installed(module: str, what: str, install: str, or_else: str | None = None) -> None:
    """`require` without the import: where importing takes seconds, or would add to the memory a benchmark measures,
    before the module is needed. `or_else`: another way that needs none, named in the message."""
    if importlib.util.find_spec(module) is None:
        raise _not_installed(module, what, install, or_else)


def _not_installed(
    name: str, what: str, install: str, or_else: str | None = None, dependency: str | None = None
) -> AxiomError:
    """The one line for a missing optional package, or for the `dependency` it imports."""
    missing = f"whose dependency {dependency} is not installed" if dependency else "which is not installed"
    alternative = f", or {or_else}" if or_else else ""
    return AxiomError(f"{what} needs {name}, {missing}: pip install {shlex.quote(install)}{alternative}")


def run_script(main: Callable[[], int | None], prog: str | None = None) -> NoReturn:
    """Run a script's `main` as axiom's commands run: an AxiomError is one line `PROG: error: ...` (by default the
    script's file name) and exit 2."""
    try:
        code = main()
    except AxiomError as e:
        print(f"{prog or Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
