"""The files a run writes as it goes: train.log, train.csv and eval.csv (rank 0 only), plus TensorBoard and
Weights & Biases when installed and asked for. Each train.log line is also logged (logging, INFO), which `axiom
train` shows on the terminal."""

from __future__ import annotations

import csv
import logging
import math
import re
import uuid
from pathlib import Path

from axiom.errors import require
from axiom.files import atomic_file

logger = logging.getLogger(__name__)

WANDB_RUN_ID = "wandb_run_id"  # in the run folder: the W&B run that a resumed run continues


class RunLog:
    """train.log, train.csv and eval.csv of rank 0, plus TensorBoard / W&B when asked for."""

    def __init__(
        self,
        run_dir: Path,
        main: bool,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        continuing: bool = False,
    ):
        """`continuing`: the run resumes from one of its checkpoints, so its W&B run is continued (not a new one)."""
        self.run_dir, self.main = run_dir, main
        self.tb = self.wandb = None
        if not main:
            return
        if tensorboard:
            self.tb = tensorboard_writer(run_dir)
        if wandb_project:
            wandb = require("wandb", "--wandb", "wandb")  # in no extra
            run_id = wandb_run_id(run_dir, continuing)
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), id=run_id, resume="allow")
            # Steps as a metric, not wandb.log's step=, which must only grow: a resumed or rolled-back run logs the
            # steps past its checkpoint again, and W&B dropped those (keeping the abandoned values).
            self.wandb.define_metric("step")
            for kind in ("train", "eval"):
                self.wandb.define_metric(f"{kind}/*", step_metric="step")

    def info(self, message: str, level: int = logging.INFO) -> None:
        if not self.main:
            return
        logger.log(level, message)
        with open(self.run_dir / "train.log", "a") as f:
            f.write(message + "\n")

    def notice(self, message: str) -> None:
        """A setting that runs, but perhaps not as meant: a "notice: " line in train.log, on stderr in a terminal."""
        self.info(f"notice: {message}", logging.WARNING)

    def row(self, name: str, columns: tuple[str, ...], values: dict) -> None:
        if not self.main:
            return
        path = self.run_dir / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(columns)
            w.writerow([format_value(values[c]) for c in columns])
        metrics = {f"{name.removesuffix('.csv')}/{k}": v for k, v in values.items() if k != "step"}
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), values["step"])
        if self.wandb is not None:
            self.wandb.log({"step": values["step"], **metrics})

    def write_rows(self, name: str, columns: tuple[str, ...], rows: list[dict]) -> None:
        """Replace the csv `name` with these rows (a small file rendered whole from the run's state)."""
        if not self.main:
            return
        with atomic_file(self.run_dir / name) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            w.writerows([format_value(row[c]) for c in columns] for row in rows)

    def truncate(self, step: int) -> None:
        """Drop csv rows after `step`: a resumed run rewrites what the killed one logged past its checkpoint, a
        torn last row included (a crash of the machine can leave zero bytes or half a line at a file's end).
        TensorBoard's events after `step` are dropped too, so that its charts show each step once, as the csvs do."""
        if not self.main:
            return
        if self.tb is not None:
            self.tb.close()
            self.tb = tensorboard_writer(self.run_dir, purge_step=step + 1)
        for name in ("train.csv", "eval.csv"):
            path = self.run_dir / name
            if not path.exists():
                continue
            with open(path, newline="", errors="replace") as f:
                rows = list(csv.reader(line.replace("\0", "") for line in f))
            if not rows or not rows[0]:  # nothing whole, not even the header: the next row starts it anew
                path.unlink()
                continue
            kept = [rows[0]] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
            with atomic_file(path) as tmp, open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(kept)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run_id(run_dir: Path, continuing: bool) -> str:
    """The W&B run id of the run in `run_dir`: the one it recorded, when continuing; else a new one, recorded."""
    path = run_dir / WANDB_RUN_ID
    if continuing and path.is_file():
        recorded = path.read_text(errors="replace").strip()
        if re.fullmatch(r"[a-z0-9]{1,64}", recorded):
            return recorded
    run_id = uuid.uuid4().hex[:16]
    with atomic_file(path) as tmp:
        tmp.write_text(run_id + "\n")
    return run_id


def tensorboard_writer(run_dir: Path, purge_step: int | None = None):
    """A SummaryWriter into RUN/tensorboard. With `purge_step`, TensorBoard discards what earlier writers logged at
    that step and after (its marker for a restart): the steps a resumed or rolled-back run logs again."""
    require("tensorboard", "--tensorboard", "tensorboard")  # in no extra
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


def format_value(v) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)  # repr: the exact value, so runs compare bit for bit
    return str(v)
