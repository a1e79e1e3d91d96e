"""The training loop: `Trainer` runs optimizer steps and hands each to the parts with one job each, the way
OLMo-core's trainer drives its callbacks: `Progress` (bar, train.log lines, train.csv), `Evaluator` (eval.csv,
best/), `Checkpointer` (step checkpoints, resume) and `SpikeRecovery` (skipped steps, rollbacks, events.csv).

A micro-batch the plan chose (micro_batch_size=auto, axiom/train/plan.py) that runs out of memory is halved and the
step redone from the same data: no step is lost or counted twice, and tokens per step stay exact.

Pretraining and fine-tuning share all of it; they differ only in the loader (and its loss mask).
"""

from __future__ import annotations

import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from axiom.config import Config
from axiom.data.loader import TrainLoader, data_kind, eval_windows, masks_documents
from axiom.data.packing import ChatLoader, chat_eval_windows
from axiom.errors import AxiomError, first_line
from axiom.files import write_json_atomic
from axiom.model.transformer import Axiom
from axiom.text.tokenizer import EOS_ID
from axiom.train.checkpointer import Checkpointer, checkpoint_record
from axiom.train.evaluator import Evaluator
from axiom.train.optim import build_optimizer, check_optimizer_state_loads, resumable_config
from axiom.train.parallel import Dist, parallelize
from axiom.train.plan import Plan, accumulation_at, plan_lines, smaller_micro_batch
from axiom.train.progress import Progress, duration, periodic
from axiom.train.recovery import SpikeRecovery
from axiom.train.runlog import RunLog
from axiom.train.state import TrainState
from axiom.train.step import Batches, StepResult, train_step


@dataclass
class TrainResult:
    step: int
    tokens: int
    history: list[StepResult] = field(default_factory=list)  # the steps this call ran
    stopped: str | None = None  # the signal that stopped training early
    last_eval: dict | None = None


class StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint at the next step boundary; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave the handlers alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, d: Dist, device: torch.device) -> bool:
        """A signal to any rank stops all of them at the same step."""
        if d.world_size > 1:
            flag = torch.tensor([1.0 if self.signal else 0.0], device=device)
            dist.all_reduce(flag)
            if flag.item() > 0 and self.signal is None:
                self.signal = "a signal to another rank"
        return self.signal is not None


def regroup(batches: Batches, size: int) -> Batches:
    """The micro-batches as read, split into micro-batches of `size` rows (a divisor of theirs), in order."""
    if batches[0][0].shape[0] == size:
        return batches
    return [(x[i : i + size], y[i : i + size]) for x, y in batches for i in range(0, x.shape[0], size)]


class Trainer:
    """One run: the model, optimizer and loader it was set up with, its `TrainState`, and its parts. `step` runs
    one optimizer step, `fit` the loop. `cfg` is the planned config (`plan.applied`): no setting is auto."""

    def __init__(
        self,
        cfg: Config,
        plan: Plan,
        data_dir: Path,
        manifest: dict,
        run_dir: Path,
        model: Axiom,
        device: torch.device,
        d: Dist,
        log: RunLog,
        state: dict | None,
    ) -> None:
        t = cfg.train
        self.cfg, self.plan, self.data_dir, self.manifest, self.run_dir = cfg, plan, data_dir, manifest, run_dir
        self.device, self.d, self.log = device, d, log
        fsdp = t.fsdp and d.world_size > 1
        self.raw = model.to(device)
        self.raw.train()
        self.chat = data_kind(manifest) == "chat"  # conversations: masked targets, whole ones per window
        self.raw.ignored_targets = self.chat  # text has none: the model need not look (a host sync on a GPU)
        if masks_documents(manifest, t.doc_masking):
            self.raw.doc_sep = EOS_ID
        self.model = parallelize(self.raw, t, device, d)
        saved_optimizer = state.get("optimizer_name") if state is not None else None
        self.optimizer, self.optimizer_name = build_optimizer(
            self.raw, resumable_config(t, saved_optimizer), device, fsdp=fsdp
        )
        check_optimizer_state_loads(saved_optimizer, self.optimizer_name, str(run_dir), fsdp)
        loader = ChatLoader if self.chat else TrainLoader
        self.loader = loader(
            data_dir,
            t.seq_len,
            t.micro_batch_size,
            t.seed,
            d.rank,
            d.world_size,
            cfg.model.vocab_size,
            t.sequences_per_step,
        )
        self.micro_steps = t.grad_accum_steps // d.world_size  # micro-batches read per step (a back-off splits them)
        record = checkpoint_record(data_dir, manifest)
        self.checkpointer = Checkpointer(
            cfg,
            run_dir / "checkpoints",
            self.raw,
            self.optimizer,
            self.optimizer_name,
            self.loader,
            d,
            fsdp,
            record,
            log,
        )
        self.evaluator = Evaluator(t, data_dir, self.raw, self.checkpointer, log)
        self.recovery = SpikeRecovery(t, self.checkpointer, log, d.main)
        self.state = self.checkpointer.restore(state) if state is not None else TrainState()
        self.progress = Progress(cfg, log, device, d.world_size, d.main)

    def step(self) -> StepResult:
        """One optimizer step over the next `grad_accum_steps` micro-batches; counts it in the state and meters.
        A non-finite step, or one whose loss exceeds spike_factor x the running average, is skipped."""
        t, s = self.cfg.train, self.state
        start = time.perf_counter()
        lr = s.lr(t)
        max_loss = self.recovery.max_loss(s)
        batches = [self.loader.next_batch() for _ in range(self.micro_steps)]
        result = self._train_step(batches, lr, max_loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        s.record(result, t.tokens_per_step, seconds)
        if result.skipped:
            self.recovery.note_skip(result, s)
        taken_loss = None if result.skipped else result.loss
        self.progress.meter.add(t.tokens_per_step, seconds, taken_loss)
        self.evaluator.window.add(t.tokens_per_step, seconds, taken_loss)
        return result

    def _train_step(self, batches: Batches, lr: float, max_loss: float) -> StepResult:
        """`train_step` over the step's micro-batches. Out of memory at a micro-batch the plan chose (one process):
        the next smaller one, and the step again from the same data; nothing was updated by the failed try (an
        out-of-memory in the update itself is an error of train_step's, never run again)."""
        while True:
            t = self.cfg.train
            try:
                return train_step(self.model, self.optimizer, regroup(batches, t.micro_batch_size), lr, t, max_loss)
            except torch.OutOfMemoryError as e:
                smaller = smaller_micro_batch(t.micro_batch_size)
                if "micro_batch_size" not in self.plan.chosen or self.d.world_size > 1 or smaller is None:
                    ways = [] if t.gradient_checkpointing else ["--set gradient_checkpointing=true"]
                    if smaller is not None:  # the same tokens per step
                        ways.append(
                            f"--set micro_batch_size={smaller} --set grad_accum_steps={accumulation_at(t, smaller)}"
                        )
                    else:
                        ways.append("a device with more memory")
                    raise AxiomError(
                        f"out of memory at micro-batch {t.micro_batch_size} (step {self.state.step + 1:,}: "
                        f"{first_line(e)}); try {', or '.join(ways)}"
                    ) from None
            self._back_off(smaller)  # outside the except block: its traceback, and the tensors it holds, are gone

    def _back_off(self, micro_batch_size: int) -> None:
        """Free the failed try's memory and continue at `micro_batch_size`, accumulation raised to match. The run's
        config is changed in place: the parts share it, checkpoints and config.json record the new split."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)  # the partial gradients of the failed try
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        before = t.micro_batch_size
        t.micro_batch_size, t.grad_accum_steps = micro_batch_size, accumulation_at(t, micro_batch_size)
        self.log.notice(
            f"out of memory at micro-batch {before} (step {self.state.step + 1:,}): micro-batch {t.micro_batch_size} "
            f"x {t.grad_accum_steps} accumulation from now on, the same {t.tokens_per_step:,} tokens per step; the "
            "step is run again from the same data"
        )
        if self.d.main:
            write_json_atomic(self.run_dir / "config.json", self.cfg.to_dict())

    def log_plan(self) -> None:
        """The run's plan at the top of train.log: model, batch, schedule, optimizer, device, data."""
        t, log = self.cfg.train, self.log
        log.info(f"run          {self.run_dir}")
        for line in plan_lines(self.cfg, self.plan, self.device, self.d.world_size, self.optimizer_name):
            log.info(line)
        val_tokens = self.manifest["val_tokens"]
        covered = eval_windows(val_tokens, t.seq_len, t.eval_tokens) * t.seq_len
        on = f"{t.eval_tokens:,} tokens"
        if self.chat:  # packed conversations, of which only the assistants' tokens are scored
            windows = chat_eval_windows(t.seq_len, t.eval_tokens)
            on = f"at most {windows:,} windows of packed conversations (their replies scored)"
        elif covered < t.eval_tokens // t.seq_len * t.seq_len:
            on = f"{covered:,} tokens (all the val split holds of eval_tokens={t.eval_tokens:,})"
        log.info(
            f"data         {self.data_dir}: {self.manifest['train_tokens']:,} train tokens, "
            f"{val_tokens:,} val tokens; eval every {t.eval_interval:,} steps on {on}, "
            f"checkpoint every {t.checkpoint_interval:,}"
        )
        if self.chat:
            windows = self.loader.epoch_windows()
            epochs = t.steps * t.micro_batch_size * t.grad_accum_steps / windows
            log.info(
                f"chat data    {self.loader.num_conversations:,} conversations, "
                f"{self.manifest['train_trained_tokens']:,} trained tokens, packed whole into about {windows:,} "
                f"windows of {t.seq_len:,}; {t.steps:,} steps cover {epochs:.2f} epochs"
            )
        if self.raw.doc_sep is not None:
            log.info("attention    within each document of a window (doc_masking)")

    def fit(self) -> TrainResult:
        t = self.cfg.train
        history: list[StepResult] = []
        # the untrained baseline: the first point of the curve
        last_eval = None
        if self.state.step == 0:
            with self.progress.timed("evaluation", self.state):
                last_eval = self.evaluator.evaluate(self.state)
        stopped = None
        self.progress.start(self.state.step)
        with StopFlag() as stop:
            while self.state.step < t.steps:
                lr = self.state.lr(t)
                result = self.step()
                history.append(result)
                self.progress.after_step(result, lr, self.state)
                if self.recovery.due(self.state):
                    self.state = self.recovery.rollback(self.state)
                    self.progress.restart(self.state.step)
                    continue
                s = self.state
                if self.evaluator.due(s):
                    with self.progress.timed("evaluation", s):
                        last_eval = self.evaluator.evaluate(s)
                stopping = stop.requested(self.d, self.device)
                if stopping or periodic(s.step, t.steps, t.checkpoint_interval) or self.checkpointer.pending:
                    with self.progress.timed("checkpoint", s):
                        path = self.checkpointer.save_if_healthy(s)
                if stopping:
                    stopped = stop.signal
                    saved = f"saved {path}" if path else "no checkpoint is written during a streak of bad steps"
                    self.log.info(f"stopped by {stopped} at step {s.step:,}: {saved}; continue with --resume")
                    break
        self.progress.close()
        s = self.state
        if not stopped:
            between = duration(self.progress.between_steps_s)
            self.log.info(
                f"done: {s.step:,} steps, {s.tokens:,} tokens in {duration(s.elapsed_s)} of training steps (all "
                f"sessions) and {between} of evaluations and checkpoints (this session); "
                f"best val loss {s.best_val_loss:.4f}"
            )
        self.log.close()
        return TrainResult(s.step, s.tokens, history, stopped, last_eval)
