"""Attention across packed conversations: document masking against none, on the chat demo (docs/finetuning.md).

Axiom packs whole conversations into a window and lets attention cross them. Document masking instead lets a token
attend only within its own conversation (a block-diagonal causal mask; with RoPE that computes exactly what each
conversation alone would). This script patches it in (`Axiom.hidden_states` with a mask that never crosses an EOS)
and measures both on the demo's chat data (`make demo-chat` first):

    speed    train steps of the demo's recipe, the two kinds interleaved A B B A in one process
    quality  (--quality) the demo's fine-tuning run with each, then the exact-match rate on the held-out questions
             and the masked val loss with and without the mask

    PYTHONPATH=. python scripts/chat_doc_masking.py [--demo runs/demo] [--rounds 8] [--quality]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from axiom import chat_demo
from axiom.checkpoint import load_model
from axiom.cli import main as axiom
from axiom.config import get_config
from axiom.evaluate import evaluate
from axiom.model import Axiom
from axiom.optim import build_optimizer
from axiom.packing import ChatLoader
from axiom.tokenizer import EOS_ID
from axiom.trainer import train_step

PLAIN = Axiom.hidden_states


def doc_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, T) ids -> (B, 1, T, T) causal mask within conversations (a conversation's EOS belongs to it)."""
    eos = (tokens == EOS_ID).long()
    seg = torch.cumsum(eos, dim=1) - eos  # (B, T) conversation number of each position
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    return (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]


def masked_hidden_states(self: Axiom, tokens, cache=None, last_only=False):
    if cache is not None:  # decoding: one conversation, nothing to mask
        return PLAIN(self, tokens, cache, last_only)
    T = tokens.shape[1]
    cos, sin, mask = self.rope_cos[:T], self.rope_sin[:T], doc_mask(tokens)
    x = self.embed(tokens)
    for i, layer in enumerate(self.layers):
        x = layer(x, cos, sin, None, i, mask)
    return self.norm(x[:, -1:] if last_only else x)


def use(masking: bool) -> None:
    Axiom.hidden_states = masked_hidden_states if masking else PLAIN


def speed(demo: Path, rounds: int, steps: int = 10) -> None:
    cfg = get_config("tiny", list(chat_demo.SFT_SETTINGS))
    model = load_model(demo / "run" / "checkpoints" / "best")[0].train()
    optimizer = build_optimizer(model, cfg.train, "cpu")[0]
    loader = ChatLoader(demo / "chat" / "data", cfg.train.seq_len, cfg.train.micro_batch_size, seed=0)
    batches = [loader.next_batch() for _ in range(steps)]
    seconds = {False: 0.0, True: 0.0}
    for r in range(rounds):
        for masking in (False, True) if r % 2 == 0 else (True, False):
            use(masking)
            start = time.perf_counter()
            for batch in batches:
                train_step(model, optimizer, [batch], 1e-4, cfg.train)
            seconds[masking] += time.perf_counter() - start
    use(False)
    tokens = rounds * steps * cfg.train.tokens_per_step
    plain, masked = tokens / seconds[False], tokens / seconds[True]
    print(f"train steps: no mask {plain:,.0f} tok/s, document mask {masked:,.0f} tok/s ({masked / plain:.3f}x)")


def quality(demo: Path) -> None:
    _, test = chat_demo.questions()
    data = demo / "chat" / "data"
    for masking in (False, True):
        use(masking)
        run = demo / f"chat-docmask-{'on' if masking else 'off'}"
        sets = [x for item in chat_demo.SFT_SETTINGS for x in ("--set", item)]
        axiom(["train", "--preset", "tiny", *sets, "--data", str(data), "--out", str(run), "--device", "cpu",
               "--init-from", str(demo / "run" / "checkpoints" / "best")])  # fmt: skip
        best = run / "checkpoints" / "best"
        scores = chat_demo.exact_match(best, test)
        model = load_model(best)[0]
        losses = {}
        for mask_eval in (False, True):
            use(mask_eval)
            losses[mask_eval] = evaluate(model, data, 128, 4, 1 << 20).loss
        right = sum(scores[k][0] for k in chat_demo.KINDS)
        asked = sum(scores[k][1] for k in chat_demo.KINDS)
        per_kind = ", ".join(f"{k} {scores[k][0]}/{scores[k][1]}" for k in chat_demo.KINDS)
        print(
            f"trained {'with' if masking else 'without'} document mask: exact match {right}/{asked} ({per_kind}); "
            f"val loss packed {losses[False]:.4f}, each conversation alone {losses[True]:.4f}"
        )
    use(False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", type=Path, help="the demo's folder (after make demo-chat)")
    parser.add_argument("--rounds", type=int, default=8, help="ABBA rounds of 10 steps each")
    parser.add_argument("--quality", action="store_true", help="also fine-tune with each and compare (minutes)")
    args = parser.parse_args()
    speed(args.demo, args.rounds)
    if args.quality:
        quality(args.demo)
