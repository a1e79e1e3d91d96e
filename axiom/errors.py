"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn


class AxiomError(Exception):
    """A user-facing error: bad input, config or file, with what to do about it."""


def run_script(main: Callable[[], int | None], prog: str | None = None) -> NoReturn:
    """Run a script's `main` as axiom's commands run: an AxiomError is one line `PROG: error: ...` (by default the
    script's file name) and exit 2."""
    try:
        code = main()
    except AxiomError as e:
        print(f"{prog or Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
