"""The run's progress for people: a tqdm bar on the terminal, and every log_interval steps a line in train.log and
a row of train.csv (loss, LR, gradient norm, throughput, MFU on known GPUs, peak memory on a GPU, time left)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch
from tqdm import tqdm

from axiom.config import Config
from axiom.model.transformer import flops_per_token
from axiom.runtime import gpu_peak_flops
from axiom.train.runlog import RunLog
from axiom.train.state import TrainState
from axiom.train.step import StepResult

TRAIN_COLUMNS = ("step", "tokens", "loss", "grad_norm", "lr", "tokens_per_s", "skipped")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def periodic(step: int, steps: int, interval: int) -> bool:
    """Whether what a run does every `interval` steps and after its last one (an evaluation, a checkpoint) is due
    after step `step` of `steps`."""
    return step % interval == 0 or step == steps


def periodic_after(step: int, steps: int, interval: int) -> int:
    """How many of the steps after `step`, up to `steps`, are `periodic`: the evaluations (or checkpoints) to come."""
    if step >= steps:
        return 0
    return steps // interval - step // interval + (steps % interval != 0)


class Meter:
    """Tokens and seconds since the last reset: the throughput of a log line or an evaluation window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tokens, self.seconds, self.steps, self.losses = 0, 0.0, 0, []

    def add(self, tokens: int, seconds: float, loss: float | None) -> None:
        self.tokens, self.seconds, self.steps = self.tokens + tokens, self.seconds + seconds, self.steps + 1
        if loss is not None:
            self.losses.append(loss)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class Progress:
    """The bar and the progress lines; `meter` counts the steps since the last line, `timed` the evaluations and
    checkpoints between steps (`clock`: seconds) into the run's `TrainState.seconds_per`."""

    def __init__(
        self,
        cfg: Config,
        log: RunLog,
        device: torch.device,
        world_size: int,
        main: bool,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cfg, self.log, self.device, self.world_size, self.main = cfg.train, log, device, world_size, main
        self.peak_flops = gpu_peak_flops(device)
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_len)
        self.meter = Meter()
        self.bar: tqdm | None = None
        self.clock = clock
        self.intervals = {"evaluation": cfg.train.eval_interval, "checkpoint": cfg.train.checkpoint_interval}
        self.spent = dict.fromkeys(self.intervals, 0.0)  # this session's seconds of each kind ...
        self.timed_count = dict.fromkeys(self.intervals, 0)  # ... over this many of them

    @contextlib.contextmanager
    def timed(self, kind: str, state: TrainState) -> Iterator[None]:
        """Time an evaluation or a checkpoint (`kind`): this session's mean of them becomes `state.seconds_per[kind]`,
        at which the ETA counts one still to come."""
        start = self.clock()
        yield
        self.spent[kind] += self.clock() - start
        self.timed_count[kind] += 1
        state.seconds_per[kind] = self.spent[kind] / self.timed_count[kind]

    @property
    def between_steps_s(self) -> float:
        """Seconds of this session's evaluations and checkpoints."""
        return sum(self.spent.values())

    def eta(self, state: TrainState) -> float:
        """Seconds to the end of a run at the line of `state`'s step: the steps left at the mean step time since the
        last line, and the evaluations and checkpoints still due (that step's own included: they follow its line)
        at `state.seconds_per`, this session's mean or, until it has timed one, the checkpoint's (neither: none)."""
        t, m = self.cfg, self.meter
        left = (t.steps - state.step) * m.seconds / m.steps
        for kind, interval in self.intervals.items():
            left += state.seconds_per.get(kind, 0.0) * periodic_after(state.step - 1, t.steps, interval)
        return left

    def mfu(self, tokens_per_s: float) -> str:
        if not self.peak_flops:
            return ""
        return f" mfu {self.flops_per_token * tokens_per_s / (self.peak_flops * self.world_size):.1%}"

    def start(self, step: int) -> None:
        t = self.cfg
        self.bar = tqdm(
            total=t.steps, initial=step, disable=None if self.main else True, unit="step", dynamic_ncols=True
        )

    def restart(self, step: int) -> None:
        """The bar back at `step` (after a rollback)."""
        self.bar.reset(total=self.cfg.steps)
        self.bar.update(step)

    def close(self) -> None:
        self.bar.close()

    def after_step(self, result: StepResult, lr: float, state: TrainState) -> None:
        """The bar moves on; every log_interval steps and at the end, a progress line."""
        tok_s = self.meter.tokens_per_s
        self.bar.set_postfix_str(
            f"loss {result.loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s{self.mfu(tok_s)}", refresh=False
        )
        self.bar.update(1)
        if state.step % self.cfg.log_interval == 0 or state.step == self.cfg.steps:
            self.log_line(result, lr, state)

    def log_line(self, result: StepResult, lr: float, state: TrainState) -> None:
        """A progress line in train.log and a row of train.csv."""
        t, s, m = self.cfg, state, self.meter
        eta = self.eta(s)
        # the step's loss, as train.csv and the bar have it; the mean of the line's steps beside it, named
        mean = f" (mean {sum(m.losses) / len(m.losses):.4f} over {len(m.losses)} steps)" if len(m.losses) > 1 else ""
        mfu = self.mfu(m.tokens_per_s)
        memory = ""
        if self.device.type == "cuda":  # the run's peak so far: what the plan predicted, measured
            memory = f" | peak mem {torch.cuda.max_memory_allocated(self.device) / 2**30:.1f} GiB"
        self.log.info(
            f"step {s.step:,}/{t.steps:,} | loss {result.loss:.4f}{mean} | lr {lr:.3e} "
            f"| grad norm {result.grad_norm:.3f} | {m.tokens_per_s:,.0f} tok/s{' |' + mfu if mfu else ''}{memory} "
            f"| eta {duration(eta)}"
        )
        row = {
            "step": s.step,
            "tokens": s.tokens,
            "loss": result.loss,
            "grad_norm": result.grad_norm,
            "lr": lr,
            "tokens_per_s": round(m.tokens_per_s, 1),
            "skipped": int(result.skipped),
        }
        self.log.row("train.csv", TRAIN_COLUMNS, row)
        m.reset()
