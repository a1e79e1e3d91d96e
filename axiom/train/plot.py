"""The loss curves of a run (`axiom plot RUN`): train and validation loss against tokens seen, from RUN/train.csv
and RUN/eval.csv; rollbacks (RUN/events.csv) are dashed vertical lines where the run continued."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from axiom.errors import AxiomError, require
from axiom.files import atomic_file, check_no_overlap, describe_missing, remove_stale_temps, write_errors


def read_csv(path: Path, columns: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """`columns` (which the header must have) and `optional` columns of a run's csv as floats, one dict per row
    (empty cells and 'nan' become nan)."""
    hint = "was it written by axiom train?"
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                raise AxiomError(f"{path}: no column {', '.join(missing)} in its header; {hint}")
            rows = list(reader)
            columns += tuple(c for c in optional if c in (reader.fieldnames or []))
    except UnicodeDecodeError:
        raise AxiomError(f"{path}: not a text file; {hint}") from None
    except csv.Error as e:
        raise AxiomError(f"{path}: not a csv file ({e}); {hint}") from None
    try:
        return [
            {k: float(row[k]) if row[k] not in ("", None) else math.nan for k in columns}
            for row in rows
            if None not in row  # a row longer than the header
        ]
    except ValueError as e:
        raise AxiomError(f"{path}: not a csv of numbers ({e}); {hint}") from None


def check_paths(run_dir: Path, out: str | Path | None) -> Path:
    """The PNG to write (default RUN/loss.png), once the run has an eval.csv and `out` is no folder and overlaps
    none of the run's csvs."""
    eval_csv = run_dir / "eval.csv"
    if not eval_csv.is_file():
        if not eval_csv.exists() and (run_dir / "train.log").is_file():  # a run started moments ago
            raise AxiomError(f"{run_dir}: no evaluation yet (eval.csv is written after the first); plot again then")
        what = "not found" if not eval_csv.exists() else describe_missing(eval_csv)
        raise AxiomError(f"{eval_csv} {what}; pass a run directory written by axiom train")
    if out and str(out).endswith(("/", os.sep)):  # Path drops the slash, and the PNG would take the folder's name
        raise AxiomError(f"--out {out} names a folder; pass the PNG file to write")
    out = Path(out) if out else run_dir / "loss.png"
    inputs = {name: run_dir / name for name in ("eval.csv", "train.csv", "events.csv")}
    check_no_overlap(out, inputs)
    if out.is_dir():
        raise AxiomError(f"--out {out} is a folder; pass the PNG file to write")
    if not out.parent.exists():  # (a file there is the write's own one-line error)
        raise AxiomError(f"--out {out}: {out.parent}: {describe_missing(out.parent)}; the folder must exist")
    return out


def read_curves(run_dir: Path) -> tuple[list[dict[str, float]], list[dict[str, float]], list[dict[str, float]]]:
    """The rows of eval.csv (with the in-loop task scores), train.csv and events.csv; the last two may be empty."""
    eval_csv, train_csv, events_csv = run_dir / "eval.csv", run_dir / "train.csv", run_dir / "events.csv"
    try:
        with open(eval_csv, newline="") as f:
            header = next(csv.reader(f), [])
    except (UnicodeDecodeError, csv.Error):
        header = []  # read_csv says what is wrong with the file
    scores = tuple(c for c in header if c.endswith(("_acc", "_acc_norm")))  # in-loop task files (eval_tasks)
    evals = read_csv(eval_csv, ("tokens", "val_loss"), optional=("train_loss", *scores))
    if not evals:
        raise AxiomError(f"{eval_csv}: no evaluation yet; plot again after the first one")
    if not any(math.isfinite(r["val_loss"]) for r in evals):
        raise AxiomError(
            f"{eval_csv}: every val_loss of its {len(evals)} evaluation(s) is NaN or inf (the run diverged); "
            "nothing to plot"
        )
    train = read_csv(train_csv, ("tokens", "loss")) if train_csv.is_file() else []
    events = read_csv(events_csv, ("tokens",)) if events_csv.is_file() else []
    return evals, train, events


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed)."""
    require("matplotlib", "axiom plot", "axiom-lm[plot]").use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(ax, evals: list[dict[str, float]], train: list[dict[str, float]], events: list[dict[str, float]]):
    """Train loss (train.csv's, else eval.csv's), val loss with its best marked, and rollbacks as dashed lines."""
    if train:
        marker = "o" if len(train) == 1 else None  # one point makes no line
        ax.plot(
            [r["tokens"] for r in train], [r["loss"] for r in train], lw=1, alpha=0.7, marker=marker, label="train loss"
        )
    elif any(math.isfinite(r.get("train_loss", math.nan)) for r in evals):
        ax.plot([r["tokens"] for r in evals], [r["train_loss"] for r in evals], "-", label="train loss")
    ax.plot([r["tokens"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val loss")
    for i, event in enumerate(events):
        # a rollback: the run continued from this many tokens, skipping the bad steps' data
        label = "rollback (events.csv)" if i == 0 else None
        ax.axvline(event["tokens"], color="tab:red", ls="--", lw=1, alpha=0.7, label=label)
    best = min((r for r in evals if math.isfinite(r["val_loss"])), key=lambda r: r["val_loss"])
    ax.annotate(
        f"best {best['val_loss']:.3f}",
        (best["tokens"], best["val_loss"]),
        textcoords="offset points",
        xytext=(0, 8),
        ha="center",
    )


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the loss curves of `run_dir` to `out` (default RUN/loss.png); returns the path."""
    run_dir = Path(run_dir)
    out = check_paths(run_dir, out)
    evals, train, events = read_curves(run_dir)
    plt = pyplot()
    tasks = [c.removesuffix("_acc") for c in evals[0] if c.endswith("_acc")]  # TrainConfig.eval_tasks columns
    if tasks:
        fig, (ax, task_ax) = plt.subplots(2, 1, figsize=(8, 8), sharex=True, height_ratios=(3, 2))
        plot_tasks(task_ax, evals, tasks)
    else:
        fig, ax = plt.subplots(figsize=(8, 5))
    kind = out.suffix[1:].lower() or "png"
    if kind not in fig.canvas.get_supported_filetypes():
        plt.close(fig)
        raise AxiomError(f"--out {out}: matplotlib cannot write .{kind} files; use .png, .pdf or .svg")
    plot_losses(ax, evals, train, events)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    with write_errors(out, f"{run_dir} is unchanged"):
        remove_stale_temps(out)
        try:
            with atomic_file(out) as tmp:  # .NAME.tmp-PID: two plots at once never share a temporary
                fig.savefig(tmp, dpi=120, bbox_inches="tight", format=kind)
        finally:
            plt.close(fig)
    return out


def plot_tasks(ax, evals: list[dict[str, float]], tasks: list[str]) -> None:
    """acc (solid) and acc_norm (dashed) of each in-loop task file against tokens, one colour per task."""
    tokens = [r["tokens"] for r in evals]
    for i, name in enumerate(tasks):
        color = f"C{i}"
        ax.plot(tokens, [r[f"{name}_acc"] for r in evals], "o-", color=color, label=f"{name} acc")
        ax.plot(tokens, [r.get(f"{name}_acc_norm", math.nan) for r in evals], "--", color=color, label="acc_norm")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
