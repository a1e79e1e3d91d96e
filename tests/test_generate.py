"""`axiom generate` on bad values: one line naming the flag, exit 2, nothing decoded; a cap by the context is said."""

import pytest
import torch

from axiom.cli import main

TINY = ["generate", "--preset", "tiny", "--set", "max_seq_len=16", "--temperature", "0"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
        (["--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1"),
        (["--top-p", "0"], "--top-p 0.0: must lie in (0, 1]"),
        (["--top-p", "2"], "--top-p 2.0: must lie in (0, 1]"),
        (["--top-k", "0"], "--top-k 0: must be at least 1"),
        (["--top-k", "-5"], "--top-k -5: must be at least 1"),
        (["--temperature", "nan"], "--temperature nan: must be 0 (greedy) or positive"),
        (["--temperature", "-1"], "--temperature -1.0: must be 0 (greedy) or positive"),
        (
            ["--prompt", " ".join(["word"] * 16)],
            "--prompt: 16 tokens, but the model's context is 16 tokens",
        ),
    ],
)
def test_bad_values_are_one_line_and_exit_2(flags, message, capsys):
    assert main([*TINY, *flags]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"axiom generate: error: {message}")


def test_a_cap_by_the_context_is_said(capsys):
    assert main([*TINY, "--prompt", "one two three four five six seven eight nine ten", "--max-new-tokens", "50"]) == 0
    out, err = capsys.readouterr()
    assert err == (
        "axiom generate: note: --max-new-tokens 50 capped to 6: the prompt (10 tokens) and its new tokens fill the "
        "context of 16\n"
    )
    assert out.startswith("one two three four five six seven eight nine ten")


def test_bfloat16_decoding(capsys):
    assert main([*TINY, "--prompt", "Hello", "--max-new-tokens", "4", "--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("Hello")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert main([*TINY, "--prompt", "Hello", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("axiom generate: error: --device cuda") and err.count("\n") == 1
