"""`TrainState`: a run's progress, what a checkpoint's state.pt stores beside the optimizer, loader and RNG states
and what resume restores. Everything the loop decides from (schedule, evaluation, best checkpoint) derives from it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from axiom.config import TrainConfig
from axiom.train.optim import lr_at
from axiom.train.step import StepResult

LOSS_AVG_DECAY = 0.95  # the running loss average spans about the last 20 steps taken


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken, skipped ones included
    tokens: int = 0  # tokens of those steps
    bad_steps: int = 0  # consecutive skipped steps (non-finite, or a loss spike)
    best_val_loss: float = math.inf
    elapsed_s: float = 0.0  # training wall time over all sessions of this run
    loss_sum: float = 0.0  # losses of the steps taken since the last evaluation: eval.csv's train_loss
    loss_count: int = 0
    loss_avg: float | None = None  # running average of the steps taken (LOSS_AVG_DECAY), for spike detection
    lr_scale: float = 1.0  # the LR multiplier after rollbacks ...
    lr_scale_until: int = 0  # ... up to this step
    rollbacks: list[dict] = field(default_factory=list)  # every rollback of the run (events.csv)
    # mean seconds of one "evaluation" and one "checkpoint" save, as the latest session to time one measured them:
    # the ETA of a resumed run counts them before it has timed its own (a checkpoint holds the saves before it)
    seconds_per: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})

    def lr_multiplier(self, step: int) -> float:
        """The rollback LR scale of step `step` while it lasts, else 1."""
        return self.lr_scale if step < self.lr_scale_until else 1.0

    def lr(self, cfg: TrainConfig, step: int | None = None) -> float:
        """The learning rate of step `step` (0-based; default the next one), lowered for a while after a rollback."""
        step = self.step if step is None else step
        return lr_at(step, cfg) * self.lr_multiplier(step)

    def record(self, result: StepResult, tokens: int, seconds: float) -> None:
        """Count a step just run: a skipped one extends the streak of bad steps, a taken one ends it and enters the
        loss averages."""
        self.step += 1
        self.tokens += tokens
        self.elapsed_s += seconds
        if result.skipped:
            self.bad_steps += 1
            return
        self.bad_steps = 0
        self.loss_sum += result.loss
        self.loss_count += 1
        self.loss_avg = (
            result.loss
            if self.loss_avg is None
            else LOSS_AVG_DECAY * self.loss_avg + (1 - LOSS_AVG_DECAY) * result.loss
        )
