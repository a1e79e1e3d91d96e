"""Shared by tests/test_generate.py and tests/test_chat.py: values that break the sampling maths, and what the
decoding commands must make of them."""

from __future__ import annotations

# Values that pass argparse but break the maths (a seed beyond torch's 64 bits, an infinite, NaN or denormal
# temperature, a top-p that rounds to 0): SamplingParams.problem() and the engine decide (refused, or greedy below
# its floor); the command's part is that either way the user sees text or one line, never a traceback.
BREAKING = [
    ["--seed", str(2**70)],
    ["--seed", str(-(2**70))],
    ["--temperature", "inf"],
    ["--temperature", "nan"],
    ["--temperature", "1e-45"],
    ["--top-p", "1e-300"],
]


def text_or_one_line(code: int, out: str, err: str, command: str, flag: str) -> None:
    """Exit 0 with text, or exit 2 with one error line naming `flag` (notices aside), and no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith("notice: ")]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith(f"axiom {command}: error: {flag} "), err
    else:
        assert code == 0 and out, err
