"""Fine-tuning speed and the attention choice on the chat demo's data (docs/finetuning.md, docs/benchmarks.md).

rows     train steps that skip the rows of ignored targets in the loss (`Axiom.forward`) against steps that
         compute every row's logits, interleaved A B B A in one process
masking  train steps with document masking (`doc_masking`, `Axiom.doc_sep`: attention only within each
         conversation, the default for chat data) against none, interleaved A B B A
quality  (--quality) the demo's fine-tuning run with each attention choice, then the exact-match rate on the
         held-out questions and the masked val loss with and without the mask

PYTHONPATH=. python scripts/bench_chat.py [--demo runs/demo] [--rounds 8] [--quality]    # after make demo-chat
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from axiom.cli import demo_chat as chat_demo
from axiom.cli import main as axiom
from axiom.config import get_config
from axiom.data.packing import ChatLoader
from axiom.eval.loss import evaluate
from axiom.model.checkpoint import load_model
from axiom.model.loss import chunked_cross_entropy, output_logits
from axiom.model.transformer import Axiom
from axiom.text.tokenizer import EOS_ID
from axiom.train.optim import build_optimizer
from axiom.train.step import train_step


def every_row_forward(self: Axiom, tokens, targets=None, cache=None, loss_chunk=None, last_only=False):
    """`Axiom.forward` as before it skipped ignored targets: the logits of every row go into the loss."""
    x = self.hidden_states(tokens, cache, last_only)
    if targets is None:
        return output_logits(x, self.lm_head.weight)
    return chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), loss_chunk)


def speed(demo: Path, rounds: int, steps: int = 10) -> None:
    cfg = get_config("tiny", list(chat_demo.SFT_SETTINGS))
    model = load_model(demo / "run" / "checkpoints" / "best")[0].train()
    optimizer = build_optimizer(model, cfg.train, "cpu")[0]
    loader = ChatLoader(demo / "chat" / "data", cfg.train.seq_len, cfg.train.micro_batch_size, seed=0)
    batches = [loader.next_batch() for _ in range(steps)]
    skipping = Axiom.forward

    def measure(name: str, variants: dict) -> None:
        seconds = dict.fromkeys(variants, 0.0)
        for r in range(rounds):
            for label in list(variants) if r % 2 == 0 else list(variants)[::-1]:
                variants[label]()
                start = time.perf_counter()
                for batch in batches:
                    train_step(model, optimizer, [batch], 1e-5, cfg.train)
                seconds[label] += time.perf_counter() - start
        (a, ta), (b, tb) = seconds.items()
        tokens = rounds * steps * cfg.train.tokens_per_step
        print(f"{name}: {a} {tokens / ta:,.0f} tok/s, {b} {tokens / tb:,.0f} tok/s ({ta / tb:.3f}x)")

    def mask(on: bool):
        return lambda: setattr(model, "doc_sep", EOS_ID if on else None)

    def forward(f):
        return lambda: setattr(Axiom, "forward", f)

    measure("loss rows", {"every row": forward(every_row_forward), "trained rows only": forward(skipping)})
    Axiom.forward = skipping
    measure("attention", {"no mask": mask(False), "document mask": mask(True)})
    model.doc_sep = None


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
        right = sum(scores[k]["right"] for k in chat_demo.KINDS)
        asked = sum(scores[k]["asked"] for k in chat_demo.KINDS)
        per_kind = ", ".join(f"{k} {scores[k]['right']}/{scores[k]['asked']}" for k in chat_demo.KINDS)
        print(
            f"doc_masking={masking}: exact match {right}/{asked} ({per_kind}); val loss of packed windows "
            f"{losses[False]:.4f}, with each conversation alone {losses[True]:.4f}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", type=Path, help="the demo's folder (after make demo-chat)")
    parser.add_argument("--rounds", type=int, default=8, help="ABBA rounds of 10 steps each")
    parser.add_argument("--quality", action="store_true", help="also fine-tune with each and compare (minutes)")
    args = parser.parse_args()
    speed(args.demo, args.rounds)
    if args.quality:
        quality(args.demo)
