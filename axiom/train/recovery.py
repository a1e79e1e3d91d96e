"""Bad steps: a step whose loss is non-finite or a spike (above spike_factor x the running average), or whose
gradient norm is non-finite, makes no update; after max_bad_steps of them in a row the run rolls back to its last
good checkpoint with a lowered LR, or stops once max_rollbacks are spent. Every rollback is a row of events.csv."""

from __future__ import annotations

import math
from pathlib import Path

from axiom.config import TrainConfig
from axiom.errors import AxiomError
from axiom.model.checkpoint import list_checkpoints, verify_checkpoint
from axiom.train.checkpointer import Checkpointer, set_aside_newer
from axiom.train.runlog import RunLog
from axiom.train.state import TrainState
from axiom.train.step import StepResult

EVENT_COLUMNS = ("step", "tokens", "event", "from_step", "skipped_windows", "lr_scale", "reason")


def rewind_logs(log: RunLog, state: TrainState | None) -> None:
    """The csvs of a run continuing from `state` (resumed or rolled back), or starting afresh (None): rows logged
    after its step are dropped, events.csv lists its rollbacks."""
    log.truncate(state.step if state is not None else -1)
    log.write_rows("events.csv", EVENT_COLUMNS, state.rollbacks if state is not None else [])


class SpikeRecovery:
    """Judges each step against the running loss average, says why a step was skipped, and rolls back or stops
    after max_bad_steps skipped steps in a row."""

    def __init__(self, cfg: TrainConfig, checkpointer: Checkpointer, log: RunLog, main: bool) -> None:
        self.cfg, self.checkpointer, self.log, self.main = cfg, checkpointer, log, main
        self.last_skip = ""  # why the newest skipped step was skipped

    def max_loss(self, state: TrainState) -> float:
        """The loss above which the next step counts as a spike."""
        t = self.cfg
        return t.spike_factor * state.loss_avg if t.spike_factor and state.loss_avg is not None else math.inf

    def note_skip(self, result: StepResult, state: TrainState) -> None:
        """Say in train.log why a step just counted in `state` was skipped."""
        t = self.cfg
        if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
            self.last_skip = f"loss {result.loss:.4g} > spike_factor {t.spike_factor:g} x average {state.loss_avg:.4g}"
        else:
            self.last_skip = f"non-finite loss {result.loss} or grad norm {result.grad_norm}"
        self.log.info(
            f"step {state.step:,}: {self.last_skip}; skipped ({state.bad_steps} in a row, limit max_bad_steps="
            f"{t.max_bad_steps})"
        )

    def due(self, state: TrainState) -> bool:
        """max_bad_steps in a row, or bad steps at the end of the run: a checkpoint of the last step must be good."""
        return state.bad_steps >= self.cfg.max_bad_steps or bool(state.bad_steps and state.step == self.cfg.steps)

    def last_good_checkpoint(self, state: TrainState) -> tuple[int, Path] | None:
        """The newest checkpoint that a later step proved healthy and whose files verify. A checkpoint's weights are
        judged by the loss of the step after it: in a streak of bad steps that began at step b, the weights of step
        b - 1 gave the first bad loss, so only checkpoints up to step b - 2 are good."""
        limit = state.step - state.bad_steps - 1
        for step, path in reversed(list_checkpoints(self.checkpointer.root)):
            if step > limit:
                continue
            try:
                verify_checkpoint(path, need_state=True)  # its files are the ones written (content hashes)
            except AxiomError as e:
                self.log.info(f"{path} does not verify, so it is not rolled back to: {e}")
                continue
            return step, path
        return None

    def stop(self, why: str, good: tuple[int, Path] | None, state: TrainState) -> AxiomError:
        """Set aside the checkpoints after `good` (so that --resume continues from it) and say why training
        stops."""
        if self.main:
            set_aside_newer(self.checkpointer.root, good[0] if good else -1, self.log)
        if good is None:
            return AxiomError(
                f"training stopped at step {state.step:,}: {why}; no checkpoint precedes the bad steps; lower lr_max "
                "or check the data, then start again (--resume starts fresh)"
            )
        return AxiomError(
            f"training stopped at step {state.step:,}: {why}, after {len(state.rollbacks)} rollbacks (max_rollbacks="
            f"{self.cfg.max_rollbacks}); the last good checkpoint is {good[1]}; lower lr_max or check the data, then "
            "--resume"
        )

    def rollback(self, state: TrainState) -> TrainState:
        """Back to the last good checkpoint, in process; returns the state training continues from. The loader
        stays where it is, so the windows consumed since that checkpoint are skipped; the LR is lowered for
        rollback_lr_steps; newer checkpoints are set aside and the good one is rewritten with this new state at
        once, so that a kill from here on resumes exactly as this process continues (a kill before that replays
        the same bad steps and the same rollback). Raises an AxiomError when it cannot (no good checkpoint, or
        max_rollbacks reached)."""
        t = self.cfg
        good = self.last_good_checkpoint(state)
        why = f"{state.bad_steps} steps in a row were skipped (the last: {self.last_skip})"
        if good is None or len(state.rollbacks) >= t.max_rollbacks:
            raise self.stop(why, good, state)
        good_dir = good[1]
        s = self.checkpointer.load(good_dir)
        scale = s.lr_multiplier(s.step) * t.rollback_lr_factor
        s.lr_scale, s.lr_scale_until = scale, s.step + t.rollback_lr_steps
        # best/, the wall time and the measured evaluation and checkpoint times are not undone
        s.best_val_loss, s.elapsed_s, s.seconds_per = state.best_val_loss, state.elapsed_s, state.seconds_per
        skipped = (state.step - s.step) * t.grad_accum_steps * t.micro_batch_size
        event = {
            "step": s.step,
            "tokens": s.tokens,
            "event": "rollback",
            "from_step": state.step,
            "skipped_windows": skipped,
            "lr_scale": scale,
            "reason": why,
        }
        s.rollbacks = [*state.rollbacks, event]
        if self.main:
            set_aside_newer(self.checkpointer.root, s.step, self.log)
        self.checkpointer.save(s)
        rewind_logs(self.log, s)
        self.log.info(
            f"step {state.step:,}: {why}; rolled back to {good_dir} (rollback {len(s.rollbacks)} of at most "
            f"{t.max_rollbacks}), skipping the {skipped:,} windows read since; lr x {scale:g} until step "
            f"{s.lr_scale_until:,}"
        )
        return s
