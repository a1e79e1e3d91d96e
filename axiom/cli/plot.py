"""`axiom plot RUN`: draw a run's train and validation loss against tokens seen (axiom/train/plot.py)."""

from __future__ import annotations

import argparse

from axiom.train.plot import plot_run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (holds eval.csv, and train.csv when logged)")
    parser.add_argument("--out", help="PNG to write (default: RUN/loss.png)")


def run(args: argparse.Namespace) -> None:
    print(f"wrote {plot_run(args.run, args.out)}")
