"""The training loop: one optimizer step (`train_step`, shared with `axiom bench train`), the run's progress
(`TrainState`, what checkpoints save and resume restores) and `Trainer`, one small method per part of the loop.

Pretraining and fine-tuning share all of it; they differ only in the loader (and its loss mask).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

from axiom.config import Config, TrainConfig
from axiom.data.loader import TrainLoader, data_kind
from axiom.data.packing import ChatLoader
from axiom.errors import AxiomError
from axiom.eval.loss import evaluate
from axiom.eval.tasks import evaluate_tasks, load_tasks, task_columns
from axiom.model.checkpoint import (
    WEIGHTS,
    list_checkpoints,
    load_training_state,
    prune_checkpoints,
    rng_state,
    save_training_state,
    save_weights,
    set_rng_state,
    step_dir_name,
    verify_checkpoint,
    write_dir_atomic,
)
from axiom.model.transformer import IGNORE_INDEX, Axiom, flops_per_token, num_params
from axiom.runtime import autocast, gpu_peak_flops
from axiom.text.chatml import TEMPLATE_NAME
from axiom.text.tokenizer import EOS_ID
from axiom.train.optim import build_optimizer, lr_at
from axiom.train.parallel import Dist, full_state, load_optimizer_state, parallelize, set_model_state
from axiom.train.runlog import RunLog

LOSS_AVG_DECAY = 0.95  # the running loss average spans about the last 20 steps taken
EVENT_COLUMNS = ("step", "tokens", "event", "from_step", "skipped_windows", "lr_scale", "reason")
EVAL_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "val_ppl", "val_bpb", "lr", "elapsed_s", "tokens_per_s")
TRAIN_COLUMNS = ("step", "tokens", "loss", "grad_norm", "lr", "tokens_per_s", "skipped")


@dataclass
class StepResult:
    loss: float  # mean over the step's micro-batches (and ranks)
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient norm, or a loss above max_loss: no update was made


def _grad_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    cfg: TrainConfig,
    max_loss: float = math.inf,
) -> StepResult:
    """One optimizer step: accumulate gradients over `micro_batches` (this rank's), clip, update.

    Each micro-batch's mean loss is weighted by its share of the step's target tokens (those not -100, over all
    ranks), so the step equals one batch of all of them also when chat data masks a different number of targets
    in each; with every target counted (text) each weight is exactly 1 / len(micro_batches). A step whose mean
    loss is non-finite or above `max_loss` (a spike), or whose gradient norm is non-finite, makes no update: its
    gradients are dropped."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    n = len(micro_batches)
    counts = [int((y != IGNORE_INDEX).sum()) for _, y in micro_batches]
    total_count, world = float(sum(counts)), 1
    if dist.is_initialized():
        world = dist.get_world_size()
        summed = torch.tensor([total_count], device=device, dtype=torch.float64)
        dist.all_reduce(summed)
        total_count = summed.item()
    mean_count = max(total_count, 1.0) / (n * world)  # target tokens per micro-batch, over all ranks
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        weight = counts[i] / mean_count  # exactly 1.0 for text data
        with _grad_sync(model, i == n - 1):
            with autocast(device, cfg.dtype):
                loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) * weight
            (loss / n).backward()
        total += loss.detach().float()
    loss = total / n
    if dist.is_initialized():  # every rank logs and judges the same mean loss
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    loss_value, norm_value = loss.item(), norm.item()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)) or loss_value > max_loss:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm_value, skipped=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, skipped=False)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


@dataclass
class TrainState:
    """A run's progress: what a checkpoint's state.pt stores beside the optimizer, loader and RNG states, and what
    resume restores. Everything the loop decides from (schedule, evaluation, best checkpoint) derives from it."""

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in known})


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


@dataclass
class TrainResult:
    step: int
    tokens: int
    history: list[StepResult] = field(default_factory=list)  # the steps this call ran
    stopped: str | None = None  # the signal that stopped training early
    last_eval: dict | None = None


class _StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint at the next step boundary; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopFlag:
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


def data_record(data_dir: Path, manifest: dict) -> dict:
    """What a checkpoint says about its data, so a model card can name it without the run's command line."""
    return {
        "dir": str(data_dir),
        "kind": data_kind(manifest),
        "sources": [Path(s["path"]).name for s in manifest["sources"]],
        **{k: manifest[k] for k in ("train_tokens", "val_tokens", "train_docs", "val_docs")},
        **{k: manifest["split"][k] for k in ("val_fraction", "split_seed")},
    }


def set_aside_newer(ckpt_root: Path, step: int, log: RunLog) -> None:
    """Rename the run's checkpoints after `step` to abandoned-step_N, so that --resume never picks them again (a
    rollback, a stop for bad steps or --resume-from an older checkpoint leaves them behind); nothing is deleted."""
    for newer_step, path in list_checkpoints(ckpt_root):
        if newer_step > step:
            target = path.with_name(f"abandoned-{path.name}")
            n = 1
            while target.exists():
                n += 1
                target = path.with_name(f"abandoned{n}-{path.name}")
            path.rename(target)
            log.info(f"set aside {path} (after the checkpoint training continues from) as {target.name}")


class Trainer:
    """One run: the model, optimizer, loader and logs it was set up with, its `TrainState`, and one small method
    per part of the loop (`step`, `evaluate`, `save`, `log_progress`). `fit` runs the loop."""

    def __init__(
        self,
        cfg: Config,
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
        self.cfg, self.data_dir, self.run_dir, self.device, self.d, self.log = cfg, data_dir, run_dir, device, d, log
        self.ckpt_root = run_dir / "checkpoints"
        self.manifest = manifest
        self.fsdp = t.fsdp and d.world_size > 1
        self.raw = model.to(device)
        self.raw.train()
        self.chat = data_kind(manifest) == "chat"  # conversations: masked targets, whole ones per window
        if self.chat if t.doc_masking is None else t.doc_masking:  # in training and evaluation alike
            self.raw.doc_sep = EOS_ID
        self.model = parallelize(self.raw, t, device, d)
        self.optimizer, self.optimizer_name = build_optimizer(self.raw, t, device, fsdp=self.fsdp)
        loader = ChatLoader if self.chat else TrainLoader
        self.loader = loader(
            data_dir, t.seq_len, t.micro_batch_size, t.seed, d.rank, d.world_size, cfg.model.vocab_size
        )
        self.tasks = load_tasks(t.task_files)  # eval_tasks: read now, so that a bad file fails before step 1
        self.micro_steps = t.grad_accum_steps // d.world_size
        self.state = TrainState()
        if state is not None:
            self._restore(state)
        self.peak_flops = gpu_peak_flops(device)
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.progress = Meter()  # since the last progress line
        self.eval_window = Meter()  # since the last evaluation
        self.save_pending = False  # a checkpoint was due during a streak of bad steps
        self.last_skip = ""  # why the newest skipped step was skipped

    def _restore(self, state: dict) -> None:
        """Optimizer, loader, RNG and TrainState from a checkpoint's state.pt (the weights are loaded apart)."""
        load_optimizer_state(self.raw, self.optimizer, state["optimizer"], self.fsdp)
        self.loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        set_rng_state(rngs[self.d.rank] if len(rngs) == self.d.world_size else rngs[0])
        self.state = TrainState.from_dict(state)

    # ---- the parts of the loop

    def lr(self) -> float:
        """The learning rate of the next step (lowered for a while after a rollback)."""
        s = self.state
        return lr_at(s.step, self.cfg.train) * (s.lr_scale if s.step < s.lr_scale_until else 1.0)

    def step(self) -> StepResult:
        """One optimizer step over the next `grad_accum_steps` micro-batches; counts it in the state and meters.
        A non-finite step, or one whose loss exceeds spike_factor x the running average, is skipped."""
        t, s = self.cfg.train, self.state
        start = time.perf_counter()
        lr = self.lr()
        max_loss = t.spike_factor * s.loss_avg if t.spike_factor and s.loss_avg is not None else math.inf
        batches = [self.loader.next_batch() for _ in range(self.micro_steps)]
        result = train_step(self.model, self.optimizer, batches, lr, t, max_loss)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        s.step += 1
        s.tokens += t.tokens_per_step
        s.elapsed_s += seconds
        if result.skipped:
            s.bad_steps += 1
            if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
                self.last_skip = f"loss {result.loss:.4g} > spike_factor {t.spike_factor:g} x average {s.loss_avg:.4g}"
            else:
                self.last_skip = f"non-finite loss {result.loss} or grad norm {result.grad_norm}"
            self.log.info(
                f"step {s.step:,}: {self.last_skip}; skipped ({s.bad_steps} in a row, limit max_bad_steps="
                f"{t.max_bad_steps})"
            )
        else:
            s.bad_steps = 0
            s.loss_sum += result.loss
            s.loss_count += 1
            s.loss_avg = (
                result.loss if s.loss_avg is None else LOSS_AVG_DECAY * s.loss_avg + (1 - LOSS_AVG_DECAY) * result.loss
            )
        taken_loss = None if result.skipped else result.loss
        self.progress.add(t.tokens_per_step, seconds, taken_loss)
        self.eval_window.add(t.tokens_per_step, seconds, taken_loss)
        return result

    def weights_finite(self) -> bool:
        """Every weight finite (on every rank: under FSDP each holds a shard)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.raw.parameters()]  # FSDP2: own shard
        finite = torch.stack([torch.isfinite(p).all() for p in local]).all().float()
        if self.d.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def healthy(self) -> bool:
        """Weights that may be written as a checkpoint: outside a streak of bad steps, and finite."""
        return self.state.bad_steps == 0 and self.weights_finite()

    def evaluate(self) -> dict:
        """Val loss (and the eval_tasks' acc and acc_norm) into eval.csv and train.log; a new lowest val loss from
        healthy weights replaces checkpoints/best."""
        t, s = self.cfg.train, self.state
        res = evaluate(self.raw, self.data_dir, t.seq_len, t.micro_batch_size, t.eval_tokens, t.dtype)
        window = self.eval_window
        row = {
            "step": s.step,
            "tokens": s.tokens,
            "train_loss": s.loss_sum / s.loss_count if s.loss_count else math.nan,
            "val_loss": res.loss,
            "val_ppl": res.ppl,
            "val_bpb": res.bpb,
            "lr": lr_at(max(s.step - 1, 0), t),
            "elapsed_s": round(s.elapsed_s, 3),
            "tokens_per_s": round(window.tokens_per_s, 1) if window.seconds > 0 else math.nan,
        }
        tasks = evaluate_tasks(self.raw, self.tasks, t.dtype)  # on every rank: an FSDP forward needs them all
        row |= tasks
        self.log.row("eval.csv", EVAL_COLUMNS + task_columns(self.tasks), row)
        marker = ""
        if math.isfinite(res.loss) and res.loss < s.best_val_loss and self.healthy():
            s.best_val_loss = res.loss
            marker = " (best)"
            self.save_best(res.loss)
        self.log.info(
            f"eval step {s.step:,}: val loss {res.loss:.4f}, ppl {res.ppl:.2f}, bpb {res.bpb:.4f}"
            f" over {res.tokens:,} tokens{marker}{''.join(f', {k} {v:.4f}' for k, v in tasks.items())}"
        )
        s.loss_sum, s.loss_count = 0.0, 0
        window.reset()
        return row

    def _progress(self, **extra) -> dict:
        return {
            "step": self.state.step,
            "tokens": self.state.tokens,
            **extra,
            "data": data_record(self.data_dir, self.manifest),
            **({"chat_template": TEMPLATE_NAME} if self.chat else {}),  # export, serve and chat apply it
        }

    def save_best(self, val_loss: float) -> None:
        weights = full_state(self.raw, None, self.fsdp)[0]  # every rank takes part under FSDP
        if self.d.main:
            progress = self._progress(val_loss=val_loss)
            write_dir_atomic(self.ckpt_root / "best", lambda tmp: save_weights(weights, self.cfg, tmp, **progress))

    def save(self) -> Path:
        """A training checkpoint of this step (weights, optimizer, loader, RNG of every rank, state); the oldest
        beyond keep_checkpoints are pruned. Callers check `healthy()` first."""
        d = self.d
        weights, optim = full_state(self.raw, self.optimizer, self.fsdp)
        rngs = [rng_state()]
        if d.world_size > 1:
            gathered = [None] * d.world_size if d.main else None
            dist.gather_object(rngs[0], gathered, dst=0)
            rngs = gathered
        target = self.ckpt_root / step_dir_name(self.state.step)
        if d.main:
            progress = self._progress()
            state = {
                **progress,
                **self.state.to_dict(),
                "optimizer": optim,
                "loader": self.loader.state_dict(),
                "rng": rngs,
                "optimizer_name": self.optimizer_name,
            }

            def write(tmp: Path) -> None:
                save_weights(weights, self.cfg, tmp, **progress)
                save_training_state(state, tmp)

            write_dir_atomic(target, write)
            prune_checkpoints(self.ckpt_root, self.cfg.train.keep_checkpoints)
        if d.world_size > 1:
            dist.barrier()
        return target

    def save_if_healthy(self) -> Path | None:
        """`save`, or None (postponed to the next healthy step) during a streak of bad steps or with
        non-finite weights: a checkpoint is always one that training can continue from."""
        if self.healthy():
            self.save_pending = False
            return self.save()
        if not self.save_pending:
            self.log.info(f"step {self.state.step:,}: checkpoint postponed until the bad steps end")
        self.save_pending = True
        return None

    def last_good_checkpoint(self) -> tuple[int, Path] | None:
        """The newest checkpoint that a later step proved healthy and whose files verify. A checkpoint's weights are
        judged by the loss of the step after it: in a streak of bad steps that began at step b, the weights of step
        b - 1 gave the first bad loss, so only checkpoints up to step b - 2 are good."""
        s = self.state
        limit = s.step - s.bad_steps - 1
        for step, path in reversed(list_checkpoints(self.ckpt_root)):
            if step > limit:
                continue
            try:
                verify_checkpoint(path, need_state=True)  # its files are the ones written (content hashes)
            except AxiomError as e:
                self.log.info(f"{path} does not verify, so it is not rolled back to: {e}")
                continue
            return step, path
        return None

    def stop_for_bad_steps(self, why: str, good: tuple[int, Path] | None) -> AxiomError:
        """Set aside the checkpoints after `good` (so that --resume continues from it) and say why training
        stops."""
        s, t = self.state, self.cfg.train
        if self.d.main:
            set_aside_newer(self.ckpt_root, good[0] if good else -1, self.log)
        if good is None:
            return AxiomError(
                f"training stopped at step {s.step:,}: {why}; no checkpoint precedes the bad steps; lower lr_max or "
                "check the data, then start again (--resume starts fresh)"
            )
        return AxiomError(
            f"training stopped at step {s.step:,}: {why}, after {len(s.rollbacks)} rollbacks (max_rollbacks="
            f"{t.max_rollbacks}); the last good checkpoint is {good[1]}; lower lr_max or check the data, then --resume"
        )

    def rollback(self) -> None:
        """After max_bad_steps skipped steps in a row: back to the last good checkpoint, in process. The loader
        stays where it is, so the windows consumed since that checkpoint are skipped; the LR is lowered for
        rollback_lr_steps; newer checkpoints are set aside and the good one is rewritten with this new state at
        once, so that a kill from here on resumes exactly as this process continues (a kill before that replays
        the same bad steps and the same rollback). Raises an AxiomError when it cannot (no good checkpoint, or
        max_rollbacks reached)."""
        t, s = self.cfg.train, self.state
        good = self.last_good_checkpoint()
        why = f"{s.bad_steps} steps in a row were skipped (the last: {self.last_skip})"
        if good is None or len(s.rollbacks) >= t.max_rollbacks:
            raise self.stop_for_bad_steps(why, good)
        from_step, best, elapsed, rollbacks = s.step, s.best_val_loss, s.elapsed_s, s.rollbacks
        loader = self.loader.state_dict()
        good_dir = good[1]
        set_model_state(self.raw, load_file(good_dir / WEIGHTS), self.fsdp)
        self._restore(load_training_state(good_dir))
        self.loader.load_state_dict(loader)  # past the windows of the abandoned steps
        s = self.state
        scale = (s.lr_scale if s.step < s.lr_scale_until else 1.0) * t.rollback_lr_factor
        s.lr_scale, s.lr_scale_until = scale, s.step + t.rollback_lr_steps
        s.best_val_loss, s.elapsed_s = best, elapsed  # best/ and the wall time are not undone
        skipped = (from_step - s.step) * t.grad_accum_steps * t.micro_batch_size
        event = {
            "step": s.step,
            "tokens": s.tokens,
            "event": "rollback",
            "from_step": from_step,
            "skipped_windows": skipped,
            "lr_scale": scale,
            "reason": why,
        }
        s.rollbacks = [*rollbacks, event]
        if self.d.main:
            set_aside_newer(self.ckpt_root, s.step, self.log)
        self.save()
        self.log.truncate(s.step)
        self.log.write_rows("events.csv", EVENT_COLUMNS, s.rollbacks)
        self.log.info(
            f"step {from_step:,}: {why}; rolled back to {good_dir} (rollback {len(s.rollbacks)} of at most "
            f"{t.max_rollbacks}), skipping the {skipped:,} windows read since; lr x {scale:g} until step "
            f"{s.lr_scale_until:,}"
        )

    def log_progress(self, result: StepResult, lr: float) -> None:
        """A progress line in train.log and a row of train.csv, every log_interval steps and at the end."""
        t, s, m = self.cfg.train, self.state, self.progress
        eta = (t.steps - s.step) * m.seconds / m.steps
        mean = sum(m.losses) / len(m.losses) if m.losses else math.nan
        mfu = self.mfu(m.tokens_per_s)
        self.log.info(
            f"step {s.step:,}/{t.steps:,} | loss {mean:.4f} | lr {lr:.3e} | grad norm {result.grad_norm:.3f} "
            f"| {m.tokens_per_s:,.0f} tok/s{' |' + mfu if mfu else ''} | eta {_duration(eta)}"
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

    def mfu(self, tokens_per_s: float) -> str:
        if not self.peak_flops:
            return ""
        return f" mfu {self.flops_per_token * tokens_per_s / (self.peak_flops * self.d.world_size):.1%}"

    def stop_requested(self, stop: _StopFlag) -> bool:
        """A signal to any rank stops all of them at the same step."""
        if self.d.world_size > 1:
            flag = torch.tensor([1.0 if stop.signal else 0.0], device=self.device)
            dist.all_reduce(flag)
            if flag.item() > 0 and stop.signal is None:
                stop.signal = "a signal to another rank"
        return stop.signal is not None

    def log_plan(self) -> None:
        """The run's plan at the top of train.log: model, batch, schedule, optimizer, device, data."""
        m, t, d, log, peak = self.cfg.model, self.cfg.train, self.d, self.log, self.peak_flops
        decay = round(t.decay_fraction * t.steps)
        log.info(f"run          {self.run_dir}")
        log.info(
            f"model        {num_params(m):,} parameters ({num_params(m, non_embedding=True):,} non-embedding): "
            f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / {m.n_kv_heads} KV heads"
        )
        log.info(
            f"batch        {t.micro_batch_size} x {t.seq_len} tokens x {t.grad_accum_steps} micro-batches "
            f"({d.world_size} process{'es' if d.world_size > 1 else ''}) = {t.tokens_per_step:,} tokens per step"
        )
        log.info(
            f"schedule     {t.steps:,} steps = {t.planned_tokens:,} tokens; warmup {t.warmup_steps:,}, "
            f"lr {t.lr_max:g} constant, cosine to {t.lr_min:g} over the last {decay:,} steps"
        )
        log.info(
            f"optimizer    {self.optimizer_name}, betas ({t.beta1}, {t.beta2}), weight decay {t.weight_decay} "
            "on matrices"
        )
        device = self.device
        precision = f"{t.dtype} autocast" if device.type == "cuda" and t.dtype != "float32" else "float32"
        estimate = ""
        if peak:  # 40% MFU is what a well-tuned run of this size reaches
            seconds = self.flops_per_token * t.planned_tokens / (0.4 * peak * d.world_size)
            estimate = f"; about {_duration(seconds)} at 40% MFU"
        log.info(f"device       {device} x {d.world_size}, {precision}{estimate}")
        log.info(
            f"data         {self.data_dir}: {self.manifest['train_tokens']:,} train tokens, "
            f"{self.manifest['val_tokens']:,} val tokens; eval every {t.eval_interval:,} steps on "
            f"{t.eval_tokens:,} tokens, checkpoint every {t.checkpoint_interval:,}"
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

    # ---- the loop

    def fit(self) -> TrainResult:
        t, s = self.cfg.train, self.state
        history: list[StepResult] = []
        last_eval = self.evaluate() if s.step == 0 else None  # the untrained baseline: the first point of the curve
        stopped = None
        bar = tqdm(
            total=t.steps, initial=s.step, disable=None if self.d.main else True, unit="step", dynamic_ncols=True
        )
        with _StopFlag() as stop:
            while s.step < t.steps:
                lr = self.lr()
                result = self.step()
                history.append(result)
                tok_s = self.progress.tokens_per_s
                bar.set_postfix_str(
                    f"loss {result.loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s{self.mfu(tok_s)}", refresh=False
                )
                bar.update(1)
                if s.step % t.log_interval == 0 or s.step == t.steps:
                    self.log_progress(result, lr)
                if s.bad_steps >= t.max_bad_steps or (s.bad_steps and s.step == t.steps):
                    self.rollback()
                    s = self.state  # restored from the checkpoint
                    bar.reset(total=t.steps)
                    bar.update(s.step)
                    continue
                if s.step % t.eval_interval == 0 or s.step == t.steps:
                    last_eval = self.evaluate()
                stopping = self.stop_requested(stop)
                if stopping or s.step % t.checkpoint_interval == 0 or s.step == t.steps or self.save_pending:
                    path = self.save_if_healthy()
                if stopping:
                    stopped = stop.signal
                    saved = f"saved {path}" if path else "no checkpoint is written during a streak of bad steps"
                    self.log.info(f"stopped by {stopped} at step {s.step:,}: {saved}; continue with --resume")
                    break
        bar.close()
        if not stopped:
            self.log.info(
                f"done: {s.step:,} steps, {s.tokens:,} tokens in {_duration(s.elapsed_s)}; "
                f"best val loss {s.best_val_loss:.4f}"
            )
        self.log.close()
        return TrainResult(s.step, s.tokens, history, stopped, last_eval)
