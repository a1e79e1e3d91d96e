"""`axiom train`: the card's recipe end to end, on one CPU or under torchrun on many GPUs.

`train` checks a run against its data and directory, builds or loads the model and runs the loop of
axiom/trainer.py; the schedule and optimizer are in axiom/optim.py.

    RUN/config.json                  resolved config of the run
    RUN/train.log                    the plan, progress lines, evaluations, notices
    RUN/train.csv                    step, tokens, loss, grad_norm, lr, tokens_per_s, skipped (every log_interval)
    RUN/eval.csv                     step, tokens, train_loss, val_loss, val_ppl, val_bpb, lr, elapsed_s, tokens_per_s
    RUN/checkpoints/step_000200/     model.safetensors + config.json + state.pt (the newest keep_checkpoints)
    RUN/checkpoints/best/            weights and config.json of the lowest val loss so far
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from axiom.checkpoint import list_checkpoints, load_model, load_training_state, read_meta
from axiom.config import Config, add_config_arguments, apply_overrides, config_from_args, get_config
from axiom.errors import AxiomError
from axiom.loader import read_manifest
from axiom.model import Axiom
from axiom.parallel import Dist, init_distributed, pick_device
from axiom.runlog import RunLog
from axiom.trainer import Trainer, TrainResult


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
        log_to = {"tensorboard": tensorboard, "wandb_project": wandb_project}
        return setup(cfg, Path(data_dir), Path(run_dir), resume, pick_device(device, d), d, init_from, log_to).fit()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup(
    cfg: Config,
    data_dir: Path,
    run_dir: Path,
    resume: bool,
    device: torch.device,
    d: Dist,
    init_from: str | Path | None = None,
    log_to: dict | None = None,
) -> Trainer:
    """Check the run against its data and directory, build or load the model, and return its Trainer."""
    t = cfg.train
    manifest = read_manifest(data_dir)
    if t.seq_len > cfg.model.max_seq_len:
        raise AxiomError(f"train config: seq_len={t.seq_len} exceeds the model's max_seq_len={cfg.model.max_seq_len}")
    if device.type == "cuda" and t.dtype == "float16":
        raise AxiomError("train config: dtype=float16 needs loss scaling, which axiom train does not do; use bfloat16")
    if t.grad_accum_steps % d.world_size:
        raise AxiomError(
            f"train config: grad_accum_steps={t.grad_accum_steps} is not divisible by the {d.world_size} processes"
        )
    ckpt_root = run_dir / "checkpoints"
    checkpoints = list_checkpoints(ckpt_root)
    if resume and not checkpoints:
        raise AxiomError(f"--resume: no complete checkpoint in {ckpt_root}; start without --resume")
    if not resume and checkpoints:
        raise AxiomError(f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    log = RunLog(run_dir, d.main, **(log_to or {}))

    seed_everything(t.seed)
    state = None
    if resume:
        latest = checkpoints[-1][1]
        model, state = load_model(latest, "cpu")[0], load_training_state(latest)
    elif init_from is not None:
        model = load_model(init_from, "cpu")[0]
    else:
        model = Axiom(cfg.model)
    trainer = Trainer(cfg, data_dir, manifest, run_dir, model, device, d, log, state)
    if resume:
        log.truncate(trainer.state.step)
        log.info(f"resumed from {latest} at step {trainer.state.step:,} ({trainer.state.tokens:,} tokens)")
    trainer.log_plan()
    return trainer


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
