"""`axiom plot RUN`: train and validation loss against tokens seen, from RUN/train.csv and RUN/eval.csv; rollbacks
(RUN/events.csv) are dashed vertical lines where the run continued."""

from __future__ import annotations

import argparse
import csv
import math
import os
from pathlib import Path

from axiom.errors import AxiomError


def read_csv(path: Path, text: tuple[str, ...] = ()) -> list[dict]:
    """Rows of a run's csv as floats (empty cells and 'nan' become nan), except the `text` columns."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    number = lambda k, v: v if k in text else float(v) if v not in ("", None) else math.nan  # noqa: E731
    try:
        return [{k: number(k, v) for k, v in row.items()} for row in rows]
    except ValueError as e:
        raise AxiomError(f"{path}: not a csv of numbers ({e}); was it written by axiom train?") from None


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss curves of `run_dir` to `out` (default RUN/loss.png); returns the path."""
    run_dir = Path(run_dir)
    eval_csv, train_csv = run_dir / "eval.csv", run_dir / "train.csv"
    if not eval_csv.is_file():
        raise AxiomError(f"{eval_csv} not found; pass a run directory written by axiom train")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise AxiomError("axiom plot needs matplotlib: pip install 'axiom-lm[plot]'") from None
    evals = read_csv(eval_csv)
    train = read_csv(train_csv) if train_csv.is_file() else []
    fig, ax = plt.subplots(figsize=(8, 5))
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, label="train loss")
    elif any(math.isfinite(r["train_loss"]) for r in evals):
        ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "-", label="train loss")
    ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    events = run_dir / "events.csv"
    for i, event in enumerate(read_csv(events, text=("event", "reason")) if events.is_file() else []):
        # a rollback: the run continued from this many tokens, skipping the bad steps' data
        label = "rollback (events.csv)" if i == 0 else None
        ax.axvline(event["tokens"], color="tab:red", ls="--", lw=1, alpha=0.7, label=label)
    best = min(evals, key=lambda r: r["val_loss"])
    ax.annotate(
        f"best {best['val_loss']:.3f}",
        (best["tokens"], best["val_loss"]),
        textcoords="offset points",
        xytext=(0, 8),
        ha="center",
    )
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "loss.png"
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, out)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run directory (holds eval.csv, and train.csv when logged)")
    parser.add_argument("--out", help="PNG to write (default: RUN/loss.png)")


def run(args: argparse.Namespace) -> None:
    print(f"wrote {plot_run(args.run, args.out)}")
