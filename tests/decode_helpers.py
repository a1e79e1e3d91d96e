"""Shared by tests/test_generate.py, tests/test_chat.py and tests/test_serve.py: values that break the sampling
maths, what the decoding commands must make of them, and a chat-tuned checkpoint that says what it is told."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import save_model

from axiom.config import get_config
from axiom.model.transformer import Axiom

SCRIPTED = [
    "d_model=32",
    "n_layers=2",
    "n_heads=2",
    "n_kv_heads=1",
    "ffn_multiple_of=32",
    "max_seq_len=4096",
    "tie_embeddings=false",
]

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


def scripted_chat_checkpoint(path: Path, chain: dict[int, int]) -> Path:
    """A chat-tuned checkpoint whose greedy next token after token a is chain[a]: the blocks add nothing (zero
    output projections), so the last hidden state is the newest token's embedding, here a basis vector, and only
    the output row of the token that follows it points along that vector."""
    cfg = get_config("tiny", SCRIPTED)
    torch.manual_seed(0)
    model = Axiom(cfg.model)
    with torch.no_grad():
        for block in model.layers:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (token, after) in enumerate(chain.items()):
            model.embed.weight[token] = torch.nn.functional.one_hot(torch.tensor(i), cfg.model.d_model)
            model.lm_head.weight[after, i] = 1.0
    path.mkdir()
    save_model(model, cfg, path, step=0)
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "chat_template": "chatml"}))
    return path
