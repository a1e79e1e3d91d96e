"""`axiom prepare`: tokenize text corpora into train/val shards with a manifest (axiom/data/prepare.py), showing
progress and a report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from axiom.config import TrainConfig
from axiom.data import chat as chat_data
from axiom.data.loader import SPLITS
from axiom.data.prepare import Progress, RunStats, default_workers, prepare
from axiom.errors import AxiomError

CARD = TrainConfig()  # the split settings and context of the card's run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="file, directory or glob of .parquet/.jsonl/.jsonl.gz/.jsonl.zst/.txt, or hf:OWNER/DATASET[:FOLDER]",
    )
    parser.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    parser.add_argument("--workers", type=int, default=default_workers(), help="tokenizer processes (default: all)")
    parser.add_argument(
        "--val-fraction", type=float, default=CARD.val_fraction, help="val share of documents (default: %(default)s)"
    )
    parser.add_argument(
        "--split-seed", type=int, default=CARD.split_seed, help="salt of the split hash (default: %(default)s)"
    )
    parser.add_argument(
        "--text-field", default="text", help="parquet column / JSON field holding the text (default: %(default)s)"
    )
    parser.add_argument(
        "--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (4 bytes each; default 100M)"
    )
    parser.add_argument(
        "--allow-empty-split",
        action="store_true",
        help="accept --val-fraction 0 (train only) or 1 (an eval-only corpus); train needs both splits",
    )
    chat = parser.add_argument_group("chat data (docs/finetuning.md)")
    chat.add_argument(
        "--chat",
        action="store_true",
        help="rows are conversations ('messages' or ShareGPT 'conversations'): ChatML ids plus a loss mask",
    )
    chat.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help=f"--chat: longest conversation in tokens, EOS included (default: the card's context, {CARD.seq_len})",
    )
    chat.add_argument(
        "--overflow",
        choices=chat_data.OVERFLOW,
        default=None,
        help="--chat: a longer conversation keeps its longest prefix ending with an assistant turn (truncate, "
        "the default) or is skipped (skip); both are counted in the manifest",
    )


def run(args: argparse.Namespace) -> None:
    if not args.chat and (args.seq_len is not None or args.overflow is not None):
        raise AxiomError("--seq-len and --overflow shape conversations: they go with --chat")
    seq_len = CARD.seq_len if args.seq_len is None else args.seq_len
    overflow = "truncate" if args.overflow is None else args.overflow
    prepare(
        args.inputs,
        args.out,
        workers=args.workers,
        val_fraction=args.val_fraction,
        split_seed=args.split_seed,
        text_field=args.text_field,
        shard_tokens=args.shard_tokens,
        allow_empty_split=args.allow_empty_split,
        chat=chat_data.chat_settings(seq_len, overflow) if args.chat else None,
        progress=Shown(),
    )


class Shown(Progress):
    """A progress bar over the input bytes, then the report."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def already_prepared(self, out: Path) -> None:
        print(f"{out} is already prepared with these settings: nothing to do")

    def started(self, total_bytes: int, done_bytes: int) -> None:
        self.bar = tqdm(
            total=total_bytes,
            initial=done_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1000,
            desc="prepare",
            dynamic_ncols=True,
        )

    def advanced(self, unit_bytes: int, docs: int) -> None:
        self.bar.update(unit_bytes)
        self.bar.set_postfix(docs=docs, refresh=False)

    def stopped(self, units_done: int, units: int) -> None:
        self.bar.close()  # its line ends before ours
        print(
            f"prepare: stopped after {units_done} of {units} units; run the same command again to continue",
            file=sys.stderr,
        )

    def ended(self) -> None:
        self.bar.close()

    def finished(self, out: Path, manifest: dict, run: RunStats) -> None:
        report(out, manifest, run)
        if "chat" in manifest:
            report_chat(manifest)
        val_fraction = manifest["split"]["val_fraction"]
        for s in SPLITS:
            if not manifest[f"{s}_docs"] and 0 < val_fraction < 1:
                print(
                    f"warning: the {s} split of {out} is empty ({manifest['train_docs'] + manifest['val_docs']} "
                    f"documents in all); axiom train needs both: use more data or another --val-fraction",
                    file=sys.stderr,
                )


def report(out: Path, m: dict, run: RunStats) -> None:
    print(f"prepared {out}: {len(m['sources'])} source files, {m['skipped_empty_docs']:,} empty documents skipped")
    for s in SPLITS:
        n = sum(1 for sh in m["shards"] if sh["split"] == s)
        print(f"  {s:<5} {m[f'{s}_docs']:>12,} docs {m[f'{s}_tokens']:>15,} tokens {n:>5} shards")
    mb = run.text_bytes / 1e6
    print(
        f"  this run: {mb:,.1f} MB of text in {run.elapsed:.1f} s = {mb / run.elapsed:.2f} MB/s "
        f"and {run.tokens / run.elapsed:,.0f} tokens/s with {run.workers} workers"
    )


def report_chat(m: dict) -> None:
    seq_len, overflow = m["chat"]["seq_len"], m["chat"]["overflow"]
    print(
        f"  chat: {m['train_trained_tokens']:,} train / {m['val_trained_tokens']:,} val tokens trained on "
        f"(assistant replies and their <|im_end|>); longer than {seq_len:,} tokens: "
        f"{m['truncated_conversations']:,} truncated, {m['skipped_long_conversations']:,} skipped "
        f"(--overflow {overflow})"
    )
