"""`axiom train`: the card's recipe end to end, on one CPU or under torchrun on many GPUs.

Reusable pieces (the benchmark imports them): `lr_at` (the schedule), `build_optimizer` and `train_step`
(one optimizer step over a list of micro-batches). `train` is the loop: evaluation, checkpoints, resume, signals.

    RUN/config.json                  resolved config of the run
    RUN/train.log                    the plan, progress lines, evaluations, notices
    RUN/train.csv                    step, tokens, loss, grad_norm, lr, tokens_per_s, skipped (every log_interval)
    RUN/eval.csv                     step, tokens, train_loss, val_loss, val_ppl, val_bpb, lr, elapsed_s, tokens_per_s
    RUN/checkpoints/step_000200/     model.safetensors + config.json + state.pt (the newest keep_checkpoints)
    RUN/checkpoints/best/            weights and config.json of the lowest val loss so far
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from axiom.checkpoint import (
    list_checkpoints,
    load_model,
    load_training_state,
    prune_checkpoints,
    read_meta,
    rng_state,
    save_training_state,
    save_weights,
    set_rng_state,
    step_dir_name,
    write_dir_atomic,
)
from axiom.config import Config, TrainConfig, add_config_arguments, apply_overrides, config_from_args, get_config
from axiom.errors import AxiomError
from axiom.evaluate import autocast, evaluate
from axiom.loader import TrainLoader, read_manifest
from axiom.model import Axiom, flops_per_token, num_params
from axiom.parallel import (
    full_state,
    gpu_peak_flops,
    init_distributed,
    load_optimizer_state,
    parallelize,
    pick_device,
)
from axiom.runlog import RunLog

EVAL_COLUMNS = ("step", "tokens", "train_loss", "val_loss", "val_ppl", "val_bpb", "lr", "elapsed_s", "tokens_per_s")
TRAIN_COLUMNS = ("step", "tokens", "loss", "grad_norm", "lr", "tokens_per_s", "skipped")


# ---- the schedule, the optimizer and one step: shared with `axiom bench train`


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr_max over warmup_steps, constant,
    then a cosine from lr_max to lr_min over the last decay_fraction of the steps (the last step uses lr_min)."""
    steps = cfg.steps
    decay_steps = round(cfg.decay_fraction * steps)
    decay_start = steps - decay_steps
    if step >= decay_start and decay_steps > 0:
        progress = (step - decay_start) / max(decay_steps - 1, 1)
        lr = cfg.lr_min + 0.5 * (cfg.lr_max - cfg.lr_min) * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:
        lr = cfg.lr_max
    if step < cfg.warmup_steps:
        lr = min(lr, cfg.lr_max * (step + 1) / cfg.warmup_steps)
    return lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every matrix (attention, MLP, and the tied embedding/output table); none on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied table appears once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _adamw8bit(groups: list[dict], cfg: TrainConfig, device: torch.device):
    """bitsandbytes AdamW8bit, or (None, why not) when it is missing or fails a probe step on this device."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its warnings concern 4-bit kernels we never use
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        return None, f"bitsandbytes is not usable ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
    try:
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))  # 8-bit state starts at 4096 elements
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe]).step()
    except Exception as e:
        return None, f"bitsandbytes AdamW8bit fails on {device.type} ({type(e).__name__})"
    opt = bnb.optim.AdamW8bit(groups, lr=cfg.lr_max, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    return opt, None


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device | str, fsdp: bool = False
) -> tuple[torch.optim.Optimizer, str]:
    """The card's optimizer: AdamW8bit when asked for and usable, else torch AdamW (fused on CPU and CUDA).

    Returns (optimizer, description); a fallback is printed as one notice line."""
    device = torch.device(device)
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        opt, why = _adamw8bit(groups, cfg, device) if not fsdp else (None, "FSDP shards need torch AdamW")
        if opt is not None:
            return opt, "AdamW8bit (bitsandbytes)"
        print(f"notice: {why}; using torch AdamW instead of AdamW8bit", file=sys.stderr)
    # One fused kernel per parameter group instead of a dozen ops per tensor (9x faster a step on CPU here).
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(groups, lr=cfg.lr_max, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    return opt, "AdamW (torch, fused)" if fused else "AdamW (torch)"


@dataclass
class StepResult:
    loss: float  # mean over the step's micro-batches (and ranks)
    grad_norm: float  # before clipping
    skipped: bool  # non-finite loss or gradient norm: no update was made


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
) -> StepResult:
    """One optimizer step: accumulate gradients over `micro_batches` (this rank's), clip, update.

    The loss of each micro-batch is divided by their number, so the step equals one batch of all of them."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    n = len(micro_batches)
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(micro_batches):
        with _grad_sync(model, i == n - 1):
            with autocast(device, cfg.dtype):
                loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
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
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
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


# ---- the loop


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
        "sources": [Path(s["path"]).name for s in manifest["sources"]],
        **{k: manifest[k] for k in ("train_tokens", "val_tokens", "train_docs", "val_docs")},
        **{k: manifest["split"][k] for k in ("val_fraction", "split_seed")},
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(
    cfg: Config,
    data_dir: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    tensorboard: bool = False,
    wandb_project: str | None = None,
    init_from: str | Path | None = None,
) -> TrainResult:
    """Train `cfg` on a prepared data directory into `run_dir`; with `resume`, continue its newest checkpoint
    (whose config is used; pass one with train-field overrides applied to change e.g. max_steps). `init_from`
    starts a new run (step 0, fresh optimizer) from a checkpoint's weights, e.g. one made by `axiom import`."""
    d = init_distributed()
    try:
        return _train(
            cfg, Path(data_dir), Path(run_dir), resume, pick_device(device, d), d, tensorboard, wandb_project, init_from
        )
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg, data_dir, run_dir, resume, device, d, tensorboard, wandb_project, init_from) -> TrainResult:
    t = cfg.train
    ckpt_root = run_dir / "checkpoints"
    manifest = read_manifest(data_dir)
    data = data_record(data_dir, manifest)
    if t.seq_len > cfg.model.max_seq_len:
        raise AxiomError(f"train config: seq_len={t.seq_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    if device.type == "cuda" and t.dtype == "float16":
        raise AxiomError("train config: dtype=float16 needs loss scaling, which axiom train does not do; use bfloat16")
    if t.grad_accum_steps % d.world_size:
        raise AxiomError(
            f"train config: grad_accum_steps={t.grad_accum_steps} is not divisible by the {d.world_size} processes"
        )
    checkpoints = list_checkpoints(ckpt_root)
    if resume and not checkpoints:
        raise AxiomError(f"--resume: no complete checkpoint in {ckpt_root}; start without --resume")
    if not resume and checkpoints:
        raise AxiomError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = RunLog(run_dir, d.main, tensorboard, wandb_project)

    seed_everything(t.seed)
    if resume:
        latest = checkpoints[-1][1]
        model, _, _ = load_model(latest, "cpu")
        state = load_training_state(latest)
    elif init_from is not None:
        model, state = load_model(init_from, "cpu")[0], None
    else:
        model, state = Axiom(cfg.model), None
    model = model.to(device)
    model.train()
    raw = model
    model = parallelize(raw, t, device, d)
    optimizer, opt_name = build_optimizer(raw, t, device, fsdp=t.fsdp and d.world_size > 1)
    fsdp = t.fsdp and d.world_size > 1
    loader = TrainLoader(data_dir, t.seq_len, t.micro_batch_size, t.seed, d.rank, d.world_size)
    micro_steps = t.grad_accum_steps // d.world_size

    step = tokens = bad_steps = 0
    elapsed = 0.0  # training wall time over all sessions of this run
    best = math.inf
    window = [0.0, 0]  # sum and count of finite step losses since the last evaluation (eval.csv's train_loss)
    if state is not None:
        load_optimizer_state(raw, optimizer, state["optimizer"], fsdp)
        loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        set_rng_state(rngs[d.rank] if len(rngs) == d.world_size else rngs[0])
        step, tokens, bad_steps = state["step"], state["tokens"], state["bad_steps"]
        elapsed, best, window = state["elapsed_s"], state["best_val_loss"], list(state["window"])
        log.truncate(step)
        log.info(f"resumed from {latest} at step {step:,} ({tokens:,} tokens)")

    peak = gpu_peak_flops(device)
    fpt = flops_per_token(cfg.model, t.seq_len)
    _print_plan(log, cfg, manifest, data_dir, run_dir, device, d, opt_name, peak, fpt)

    def save() -> Path:
        weights, optim = full_state(raw, optimizer, fsdp)
        rngs = [rng_state()]
        if d.world_size > 1:
            gathered = [None] * d.world_size if d.main else None
            dist.gather_object(rngs[0], gathered, dst=0)
            rngs = gathered
        target = ckpt_root / step_dir_name(step)
        if d.main:
            progress = {"step": step, "tokens": tokens, "data": data}
            state = {
                **progress,
                "optimizer": optim,
                "loader": loader.state_dict(),
                "rng": rngs,
                "bad_steps": bad_steps,
                "elapsed_s": elapsed,
                "best_val_loss": best,
                "window": window,
                "optimizer_name": opt_name,
            }

            def write(tmp: Path) -> None:
                save_weights(weights, cfg, tmp, **progress)
                save_training_state(state, tmp)

            write_dir_atomic(target, write)
            prune_checkpoints(ckpt_root, t.keep_checkpoints)
        if d.world_size > 1:
            dist.barrier()
        return target

    def run_eval() -> dict:
        nonlocal best, window
        res = evaluate(raw, data_dir, t.seq_len, t.micro_batch_size, t.eval_tokens, t.dtype)
        row = {
            "step": step,
            "tokens": tokens,
            "train_loss": window[0] / window[1] if window[1] else math.nan,
            "val_loss": res.loss,
            "val_ppl": res.ppl,
            "val_bpb": res.bpb,
            "lr": lr_at(max(step - 1, 0), t),
            "elapsed_s": round(elapsed, 3),
            "tokens_per_s": round(window_tokens / window_time, 1) if window_time > 0 else math.nan,
        }
        log.row("eval.csv", EVAL_COLUMNS, row)
        marker = ""
        if res.loss < best:
            best = res.loss
            marker = " (best)"
            weights = full_state(raw, None, fsdp)[0]
            if d.main:
                progress = {"step": step, "tokens": tokens, "val_loss": res.loss, "data": data}
                write_dir_atomic(ckpt_root / "best", lambda tmp: save_weights(weights, cfg, tmp, **progress))
        log.info(
            f"eval step {step:,}: val loss {res.loss:.4f}, ppl {res.ppl:.2f}, bpb {res.bpb:.4f}"
            f" over {res.tokens:,} tokens{marker}"
        )
        window = [0.0, 0]
        return row

    history: list[StepResult] = []
    last_eval = None
    window_tokens, window_time = 0, 0.0
    log_tokens, log_time, log_steps, log_losses = 0, 0.0, 0, []  # since the last progress line
    if step == 0:
        last_eval = run_eval()  # the untrained baseline: the first point of the curve
    stopped = None
    bar = tqdm(total=t.steps, initial=step, disable=None if d.main else True, unit="step", dynamic_ncols=True)
    with _StopFlag() as stop:
        while step < t.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, t)
            batches = [loader.next_batch() for _ in range(micro_steps)]
            result = train_step(model, optimizer, batches, lr, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            tokens += t.tokens_per_step
            elapsed += dt
            window_tokens, window_time = window_tokens + t.tokens_per_step, window_time + dt
            log_tokens, log_time, log_steps = log_tokens + t.tokens_per_step, log_time + dt, log_steps + 1
            history.append(result)
            if result.skipped:
                bad_steps += 1
                log.info(
                    f"step {step:,}: non-finite loss {result.loss} or grad norm {result.grad_norm}; skipped "
                    f"({bad_steps} in a row, limit max_bad_steps={t.max_bad_steps})"
                )
            else:
                bad_steps = 0
                window[0] += result.loss
                window[1] += 1
                log_losses.append(result.loss)
            tok_s = log_tokens / log_time if log_time > 0 else 0.0
            mfu = f" mfu {fpt * tok_s / (peak * d.world_size):.1%}" if peak else ""
            bar.set_postfix_str(f"loss {result.loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s{mfu}", refresh=False)
            bar.update(1)
            if step % t.log_interval == 0 or step == t.steps:
                eta = (t.steps - step) * log_time / log_steps
                mean = sum(log_losses) / len(log_losses) if log_losses else math.nan
                log.info(
                    f"step {step:,}/{t.steps:,} | loss {mean:.4f} | lr {lr:.3e} | grad norm {result.grad_norm:.3f} "
                    f"| {tok_s:,.0f} tok/s{' |' + mfu if mfu else ''} | eta {_duration(eta)}"
                )
                log.row(
                    "train.csv",
                    TRAIN_COLUMNS,
                    {
                        "step": step,
                        "tokens": tokens,
                        "loss": result.loss,
                        "grad_norm": result.grad_norm,
                        "lr": lr,
                        "tokens_per_s": round(tok_s, 1),
                        "skipped": int(result.skipped),
                    },
                )
                log_tokens, log_time, log_steps, log_losses = 0, 0.0, 0, []
            if bad_steps >= t.max_bad_steps:
                last = list_checkpoints(ckpt_root)
                where = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                raise AxiomError(
                    f"training stopped at step {step:,}: {bad_steps} steps in a row had a non-finite loss or "
                    f"gradient norm; {where}; lower lr_max or check the data, then --resume"
                )
            if step % t.eval_interval == 0 or step == t.steps:
                last_eval = run_eval()
                window_tokens, window_time = 0, 0.0
            if d.world_size > 1:  # a signal to any rank stops all of them at the same step
                flag = torch.tensor([1.0 if stop.signal else 0.0], device=device)
                dist.all_reduce(flag)
                if flag.item() > 0 and stop.signal is None:
                    stop.signal = "a signal to another rank"
            if stop.signal or step % t.checkpoint_interval == 0 or step == t.steps:
                path = save()
                if stop.signal:
                    stopped = stop.signal
                    log.info(f"stopped by {stopped} at step {step:,}: saved {path}; continue with --resume")
                    break
    bar.close()
    if not stopped:
        log.info(f"done: {step:,} steps, {tokens:,} tokens in {_duration(elapsed)}; best val loss {best:.4f}")
    log.close()
    return TrainResult(step, tokens, history, stopped, last_eval)


def _print_plan(log, cfg, manifest, data_dir, run_dir, device, d, opt_name, peak, fpt) -> None:
    m, t = cfg.model, cfg.train
    decay = round(t.decay_fraction * t.steps)
    log.info(f"run          {run_dir}")
    log.info(
        f"model        {num_params(m):,} parameters ({num_params(m, non_embedding=True):,} non-embedding): "
        f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / {m.n_kv_heads} KV heads"
    )
    log.info(
        f"batch        {t.micro_batch_size} x {t.seq_len} tokens x {t.grad_accum_steps} micro-batches "
        f"({d.world_size} process{'es' if d.world_size > 1 else ''}) = {t.tokens_per_step:,} tokens per step"
    )
    log.info(
        f"schedule     {t.steps:,} steps = {t.planned_tokens:,} tokens; warmup {t.warmup_steps:,}, lr {t.lr_max:g} "
        f"constant, cosine to {t.lr_min:g} over the last {decay:,} steps"
    )
    log.info(f"optimizer    {opt_name}, betas ({t.beta1}, {t.beta2}), weight decay {t.weight_decay} on matrices")
    precision = f"{t.dtype} autocast" if device.type == "cuda" and t.dtype != "float32" else "float32"
    estimate = ""
    if peak:  # 40% MFU is what a well-tuned run of this size reaches
        seconds = fpt * t.planned_tokens / (0.4 * peak * d.world_size)
        estimate = f"; about {_duration(seconds)} at 40% MFU"
    log.info(f"device       {device} x {d.world_size}, {precision}{estimate}")
    log.info(
        f"data         {data_dir}: {manifest['train_tokens']:,} train tokens, {manifest['val_tokens']:,} val tokens; "
        f"eval every {t.eval_interval:,} steps on {t.eval_tokens:,} tokens, checkpoint every "
        f"{t.checkpoint_interval:,}"
    )


# ---- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, help="prepared data directory (from axiom prepare)")
    parser.add_argument("--out", required=True, help="run directory for logs, eval.csv and checkpoints")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in OUT (its config; --set may change train fields)",
    )
    parser.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start a new run from this checkpoint's weights and model shape (e.g. from axiom import); "
        "training fields come from --preset and --set",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")


def _model_fixed(base: Config, overrides: list[str], flag: str) -> Config:
    """`base` with --set applied, refusing changes to the model's shape (the weights fix it)."""
    cfg = apply_overrides(base, overrides)
    if cfg.model != base.model:
        raise AxiomError(f"{flag}: --set may change training fields only, not the model's shape")
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.resume and args.init_from:
        raise AxiomError("--resume and --init-from exclude each other: --resume continues OUT's own checkpoints")
    if args.resume:
        checkpoints = list_checkpoints(Path(args.out) / "checkpoints")
        if not checkpoints:
            raise AxiomError(f"--resume: no complete checkpoint in {Path(args.out) / 'checkpoints'}")
        cfg = _model_fixed(Config.from_dict(read_meta(checkpoints[-1][1])), args.overrides, "--resume")
    elif args.init_from:
        saved = Config.from_dict(read_meta(args.init_from))
        cfg = _model_fixed(Config(saved.model, get_config(args.preset).train), args.overrides, "--init-from")
    else:
        cfg = config_from_args(args)
    train(cfg, args.data, args.out, args.resume, args.device, args.tensorboard, args.wandb, args.init_from)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"outputs in {args.out}: eval.csv, train.log, checkpoints/ (best: {args.out}/checkpoints/best)")
    return 0
