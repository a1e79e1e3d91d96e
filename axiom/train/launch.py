"""`axiom train`: the card's recipe end to end, on one CPU or under torchrun on many GPUs.

`train` checks a run against its data and directory, builds or loads the model and runs the loop of
axiom/train/trainer.py; the schedule and optimizer are in axiom/train/optim.py.

    RUN/config.json                  resolved config of the run
    RUN/train.log                    the plan, progress lines, evaluations, notices
    RUN/train.csv                    step, tokens, loss, grad_norm, lr, tokens_per_s, skipped (every log_interval)
    RUN/eval.csv                     step, tokens, train_loss, val_loss, val_ppl, val_bpb, lr, elapsed_s, tokens_per_s
                                     (+ NAME_acc, NAME_acc_norm per eval_tasks file)
    RUN/checkpoints/step_000200/     model.safetensors + config.json + state.pt (the newest keep_checkpoints)
    RUN/checkpoints/best/            weights and config.json of the lowest val loss so far
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from axiom.cli.args import add_config_arguments, add_device_argument, config_from_args
from axiom.config import Config, apply_overrides, get_config
from axiom.data.loader import read_manifest
from axiom.errors import AxiomError
from axiom.files import check_no_overlap, output_lock, write_errors, write_json_atomic
from axiom.interop.hf.folder import folder_config, read_folder
from axiom.model.checkpoint import (
    clean_stale_checkpoints,
    load_model,
    load_training_state,
    newest_valid_checkpoint,
    read_meta,
    verify_checkpoint,
)
from axiom.model.transformer import Axiom
from axiom.runtime import pick_device
from axiom.train.checkpointer import set_aside_newer
from axiom.train.parallel import Dist, init_distributed, set_model_state
from axiom.train.recovery import rewind_logs
from axiom.train.runlog import RunLog
from axiom.train.trainer import Trainer, TrainResult


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
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train `cfg` on a prepared data directory into `run_dir`.

    `resume`: continue the newest checkpoint of `run_dir`, or start fresh if it has none yet (so one command line
    can be re-run after any preemption); the model's shape comes from the checkpoint, training fields from `cfg`.
    `resume_from`: continue this training checkpoint instead (newer ones of the run are moved aside).
    `init_from`: a new run (step 0, fresh optimizer) from the weights of a checkpoint or a Hugging Face folder."""
    d = init_distributed()
    try:
        run_dir, data_dir = Path(run_dir), Path(data_dir)
        inputs = [("--data", data_dir), ("--init-from", init_from), *(("eval_tasks", f) for f in cfg.train.task_files)]
        check_no_overlap(run_dir, inputs)
        log_to = {"tensorboard": tensorboard, "wandb_project": wandb_project}
        device = pick_device(device, d.local_rank)
        with contextlib.ExitStack() as held:
            if d.main:  # one writer per run directory; a full disk or read-only target is one line
                held.enter_context(write_errors(run_dir, "the checkpoints written so far are intact; then --resume"))
                held.enter_context(output_lock(run_dir, "train"))
            return setup(cfg, data_dir, run_dir, resume, device, d, init_from, resume_from, log_to).fit()
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
    resume_from: str | Path | None = None,
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
    notes = clean_stale_checkpoints(run_dir / "checkpoints") if d.main else []  # a kill's leftovers, under the lock
    skipped: list[tuple[Path, str]] = []
    if resume_from is not None:
        start = Path(resume_from)
        verify_checkpoint(start, need_state=True)
    elif resume:
        start, skipped = newest_valid_checkpoint(run_dir / "checkpoints")
    else:
        start = None
    used = run_dir.is_dir() and any(run_dir.iterdir())
    if start is None and used and not resume:
        raise AxiomError(f"{run_dir} already holds a run; pass --resume to continue it, or choose a new --out")
    if start is not None and used and not start.resolve().is_relative_to((run_dir / "checkpoints").resolve()):
        raise AxiomError(f"--resume-from {start}: not a checkpoint of {run_dir}; continue it into an empty --out")
    state = load_training_state(start) if start is not None else None  # first: a bad state.pt is refused early
    if d.world_size > 1:
        dist.barrier()  # every rank has judged the directory before rank 0 writes into it
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
    log = RunLog(run_dir, d.main, **(log_to or {}))
    for line in notes:
        log.info(f"cleaned up: {line}")
    for path, reason in skipped:
        log.info(f"--resume: skipped {path}, which does not verify ({reason})")

    seed_everything(t.seed)
    if start is not None:
        model = load_model(start, "cpu")[0]
    elif init_from is not None:
        model = initial_model(Path(init_from))
    else:
        model = Axiom(cfg.model)
    trainer = Trainer(cfg, data_dir, manifest, run_dir, model, device, d, log, state)
    if start is not None:
        if d.main:
            set_aside_newer(run_dir / "checkpoints", trainer.state.step, log)
        rewind_logs(log, trainer.state)
        log.info(f"resumed from {start} at step {trainer.state.step:,} ({trainer.state.tokens:,} tokens)")
    elif used:
        log.truncate(-1)
        log.info(f"--resume: {run_dir} has no complete checkpoint yet; starting fresh")
    trainer.log_plan()
    return trainer


def _is_hf_folder(path: Path) -> bool:
    meta = read_meta(path)
    return "model" not in meta and ("architectures" in meta or "model_type" in meta)


def initial_model(path: Path) -> Axiom:
    """The model of --init-from: an Axiom checkpoint, or a Hugging Face folder read as `axiom import` reads it."""
    if not _is_hf_folder(path):
        return load_model(path, "cpu")[0]
    _, cfg, state, _ = read_folder(path)
    model = Axiom(cfg.model)
    set_model_state(model, state, fsdp=False)
    return model


def checkpoint_config(path: Path) -> Config:
    """The Config stored in a checkpoint's or a Hugging Face folder's config.json."""
    if _is_hf_folder(path):
        return folder_config(path)[1]
    try:
        return Config.from_dict(read_meta(path))
    except (KeyError, TypeError) as e:
        raise AxiomError(f"{path / 'config.json'}: no valid model/train config ({e})") from None


# ---- the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, help="prepared data directory (from axiom prepare)")
    parser.add_argument("--out", required=True, help="run directory for logs, eval.csv and checkpoints")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in OUT (its config; --set may change train fields), or "
        "start fresh if OUT has none yet: one command line to re-run after any preemption",
    )
    parser.add_argument(
        "--resume-from",
        metavar="CKPT",
        help="continue from this checkpoint of OUT (e.g. when the newest is corrupt); newer checkpoints are moved "
        "aside to abandoned-step_N",
    )
    parser.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start a new run from the weights and model shape of a checkpoint or a Hugging Face folder (axiom or "
        "Llama format, as axiom import reads it); training fields come from --preset and --set",
    )
    add_device_argument(parser)
    parser.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")


def _model_fixed(base: Config, overrides: list[str], flag: str) -> Config:
    """`base` with --set applied, refusing changes to the model's shape (the weights fix it)."""
    cfg = apply_overrides(base, overrides)
    if cfg.model != base.model:
        raise AxiomError(f"{flag}: --set may change training fields only, not the model's shape")
    return cfg


def run(args: argparse.Namespace) -> int:
    if sum(bool(x) for x in (args.resume, args.resume_from, args.init_from)) > 1:
        raise AxiomError("--resume, --resume-from and --init-from exclude each other")
    start = args.resume_from
    if start is None and args.resume:  # the one train() will pick (it names the ones it skips in train.log)
        start = newest_valid_checkpoint(Path(args.out) / "checkpoints")[0]
    if start is not None:
        cfg = _model_fixed(checkpoint_config(Path(start)), args.overrides, "--resume")
    elif args.init_from:
        saved = checkpoint_config(Path(args.init_from))
        cfg = _model_fixed(Config(saved.model, get_config(args.preset).train), args.overrides, "--init-from")
    else:
        cfg = config_from_args(args)
    train(
        cfg,
        args.data,
        args.out,
        args.resume,
        args.device,
        args.tensorboard,
        args.wandb,
        args.init_from,
        args.resume_from,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"outputs in {args.out}: eval.csv, train.log, checkpoints/ (best: {args.out}/checkpoints/best)")
    return 0
