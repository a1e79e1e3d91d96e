"""Attention across packed conversations: document masking against none, on the chat demo (docs/finetuning.md).

Fine-tuning on chat data masks attention at conversation boundaries by default (`doc_masking`, `Axiom.doc_sep`):
a token attends only within its own conversation, which with RoPE computes exactly what each conversation alone
would. The alternative lets attention cross the conversations of a window (`--set doc_masking=false`). This script
measures both on the demo's chat data (run `make demo-chat` first):

    speed    train steps of the demo's recipe, the two interleaved A B B A in one process
    quality  (--quality) the demo's fine-tuning run with each, then the exact-match rate on the held-out questions
             and the masked val loss of the packed windows with and without the mask

    PYTHONPATH=. python scripts/chat_doc_masking.py [--demo runs/demo] [--rounds 8] [--quality]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from axiom import chat_demo
from axiom.checkpoint import load_model
from axiom.cli import main as axiom
from axiom.config import get_config
from axiom.evaluate import evaluate
from axiom.optim import build_optimizer
from axiom.packing import ChatLoader
from axiom.tokenizer import EOS_ID
from axiom.trainer import train_step


def speed(demo: Path, rounds: int, steps: int = 10) -> None:
    cfg = get_config("tiny", list(chat_demo.SFT_SETTINGS))
    model = load_model(demo / "run" / "checkpoints" / "best")[0].train()
    optimizer = build_optimizer(model, cfg.train, "cpu")[0]
    loader = ChatLoader(demo / "chat" / "data", cfg.train.seq_len, cfg.train.micro_batch_size, seed=0)
    batches = [loader.next_batch() for _ in range(steps)]
    seconds = {False: 0.0, True: 0.0}
    for r in range(rounds):
        for masking in (False, True) if r % 2 == 0 else (True, False):
            model.doc_sep = EOS_ID if masking else None
            start = time.perf_counter()
            for batch in batches:
                train_step(model, optimizer, [batch], 1e-4, cfg.train)
            seconds[masking] += time.perf_counter() - start
    tokens = rounds * steps * cfg.train.tokens_per_step
    plain, masked = tokens / seconds[False], tokens / seconds[True]
    print(f"train steps: no mask {plain:,.0f} tok/s, document mask {masked:,.0f} tok/s ({masked / plain:.3f}x)")


def quality(demo: Path) -> None:
    _, test = chat_demo.questions()
    data = demo / "chat" / "data"
    for masking in (False, True):
        run = demo / f"chat-doc-masking-{str(masking).lower()}"
        sets = [x for item in (*chat_demo.SFT_SETTINGS, f"doc_masking={masking}") for x in ("--set", item)]
        axiom(["train", "--preset", "tiny", *sets, "--data", str(data), "--out", str(run), "--device", "cpu",
               "--init-from", str(demo / "run" / "checkpoints" / "best")])  # fmt: skip
        best = run / "checkpoints" / "best"
        scores = chat_demo.exact_match(best, test)
        model = load_model(best)[0]
        losses = {}
        for mask_eval in (False, True):
            model.doc_sep = EOS_ID if mask_eval else None
            losses[mask_eval] = evaluate(model, data, 128, 4, 1 << 20).loss
        right = sum(scores[k][0] for k in chat_demo.KINDS)
        asked = sum(scores[k][1] for k in chat_demo.KINDS)
        per_kind = ", ".join(f"{k} {scores[k][0]}/{scores[k][1]}" for k in chat_demo.KINDS)
        print(
            f"doc_masking={masking}: exact match {right}/{asked} ({per_kind}); val loss of packed windows "
            f"{losses[False]:.4f}, with each conversation alone {losses[True]:.4f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default="runs/demo", type=Path, help="the demo's folder (after make demo-chat)")
    parser.add_argument("--rounds", type=int, default=8, help="ABBA rounds of 10 steps each")
    parser.add_argument("--quality", action="store_true", help="also fine-tune with each and compare (minutes)")
    args = parser.parse_args()
    speed(args.demo, args.rounds)
    if args.quality:
        quality(args.demo)
