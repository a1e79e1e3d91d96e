"""The one exception type that the CLI turns into a one-line message and a non-zero exit."""


class AxiomError(Exception):
    """A user-facing error: bad input, config or file, with what to do about it."""
