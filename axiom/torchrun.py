"""What torchrun tells each process it starts, through the environment: how many there are and which one this is.
Read without torch, so that the CLI can judge which process speaks before a command imports it."""

from __future__ import annotations

import os

from axiom.errors import AxiomError


def count(name: str, default: str) -> int:
    """The count torchrun put in `name` (`default` where unset); any other value is one AxiomError."""
    value = os.environ.get(name, default)
    if not value.strip().isdecimal():  # isdigit() takes "²", which int() does not
        raise AxiomError(
            f"{name}={value!r} in the environment is no count: torchrun sets it; launch with torchrun, or unset "
            f"{name} to train in one process"
        )
    return int(value)


def is_first(rank_variable: str) -> bool:
    """Whether this process says what all of torchrun's processes would say alike: under torchrun (WORLD_SIZE > 1)
    the one whose `rank_variable` (RANK: of the run; LOCAL_RANK: of this machine) is 0; any process torchrun did not
    start. Never an error, for it decides who says one: a variable that is no count (another tool's, or the very
    error being said) makes this process speak."""
    try:
        return count("WORLD_SIZE", "1") <= 1 or count(rank_variable, "0") == 0
    except AxiomError:
        return True
