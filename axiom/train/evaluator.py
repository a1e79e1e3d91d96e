"""The run's evaluations: val loss, perplexity and bits per byte (and each eval_tasks file's acc and acc_norm) into
eval.csv and train.log; a new lowest val loss from healthy weights replaces checkpoints/best."""

from __future__ import annotations

import math
from pathlib import Path

from axiom.config import TrainConfig
from axiom.eval.loss import evaluate, val_batches
from axiom.eval.tasks import evaluate_tasks, load_tasks, task_columns
from axiom.model.transformer import Axiom
from axiom.train.checkpointer import Checkpointer
from axiom.train.progress import Meter, periodic
from axiom.train.runlog import RunLog
from axiom.train.state import TrainState

EVAL_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "val_ppl", "val_bpb", "lr", "elapsed_s", "tokens_per_s")


class Evaluator:
    """Evaluates `model` on the data's validation split; `window` counts the steps since the last evaluation."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, model: Axiom, checkpointer: Checkpointer, log: RunLog) -> None:
        self.cfg, self.data_dir, self.model, self.checkpointer, self.log = cfg, data_dir, model, checkpointer, log
        self.tasks = load_tasks(cfg.task_files)  # read now, so that a bad file fails before step 1
        # the val split's first batch too: damaged or empty, it fails while a new run's folder can still be removed
        next(val_batches(data_dir, cfg.seq_len, cfg.micro_batch_size, cfg.eval_tokens, model.cfg.vocab_size), None)
        self.window = Meter()

    def due(self, state: TrainState) -> bool:
        return periodic(state.step, self.cfg.steps, self.cfg.eval_interval)

    def evaluate(self, state: TrainState) -> dict:
        """One evaluation of the weights at `state`: its row of eval.csv, which is also logged."""
        t, s = self.cfg, state
        res = evaluate(self.model, self.data_dir, t.seq_len, t.micro_batch_size, t.eval_tokens, t.dtype)
        window = self.window
        row = {
            "step": s.step,
            "tokens": s.tokens,
            "train_loss": s.loss_sum / s.loss_count if s.loss_count else math.nan,
            "val_loss": res.loss,
            "val_ppl": res.ppl,
            "val_bpb": res.bpb,
            "lr": s.lr(t, max(s.step - 1, 0)),  # the last step's, as train.csv has it
            "elapsed_s": round(s.elapsed_s, 3),
            "tokens_per_s": round(window.tokens_per_s, 1) if window.seconds > 0 else math.nan,
        }
        tasks = evaluate_tasks(self.model, self.tasks, t.dtype)  # on every rank: an FSDP forward needs them all
        row |= tasks
        self.log.row("eval.csv", EVAL_COLUMNS + task_columns(self.tasks), row)
        marker = ""
        if math.isfinite(res.loss) and res.loss < s.best_val_loss and self.checkpointer.healthy(s):
            s.best_val_loss = res.loss
            marker = " (best)"
            self.checkpointer.save_best(s, res.loss)
        self.log.info(
            f"eval step {s.step:,}: val loss {res.loss:.4f}, ppl {res.ppl:.2f}, bpb {res.bpb:.4f}"
            f" over {res.tokens:,} tokens{marker}{''.join(f', {k} {v:.4f}' for k, v in tasks.items())}"
        )
        s.loss_sum, s.loss_count = 0.0, 0
        window.reset()
        return row
