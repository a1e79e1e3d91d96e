"""`axiom train`: the card's recipe end to end, on one CPU or under torchrun on many GPUs (axiom/train/launch.py).

The command settles the run's config (a preset with a --config file and --set, or the checkpoint's model shape for
--resume and --init-from), reads a Hugging Face folder given to --init-from through axiom.interop, and shows
train.log's lines on the terminal as they are written."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from axiom import torchrun
from axiom.cli.args import (
    add_config_arguments,
    add_device_argument,
    config_file,
    config_from_args,
    preset_of,
    say_notices,
)
from axiom.config import Config, ConfigFile, apply_overrides, changed_fields, get_config, is_hf_config
from axiom.data.loader import read_manifest
from axiom.errors import AxiomError
from axiom.interop.hf.folder import folder_config, read_folder
from axiom.model.checkpoint import CONFIG, config_of, newest_valid_checkpoint, read_meta
from axiom.train.launch import check_resume_from_folder, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--data", required=True, help="prepared data directory (from axiom prepare)")
    parser.add_argument("--out", required=True, help="run directory for logs, eval.csv and checkpoints")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in OUT (its config; --config and --set may change training "
        "fields), or start fresh if OUT has none yet (with --init-from: from its weights): one command line to re-run "
        "after any preemption",
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
        "Llama format, as axiom import reads it); training fields come from --preset, --config and --set; with "
        "--resume, only where OUT has no checkpoint yet",
    )
    add_device_argument(parser)
    parser.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log to this Weights & Biases project")


def hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face folder's weights as Axiom's state dict, read as `axiom import` reads it."""
    return read_folder(path)[2]


def checkpoint_config(path: Path) -> Config:
    """The Config stored in a checkpoint's or a Hugging Face folder's config.json."""
    meta = read_meta(path)
    return folder_config(path)[1] if is_hf_config(meta) else config_of(meta, path / CONFIG)


def _model_fixed(base: Config, file: ConfigFile | None, overrides: list[str], flag: str) -> Config:
    """`base` with the --config file and --set applied, refusing changes to the model's shape (the weights fix it)."""
    cfg = apply_overrides(base, overrides, file)
    changed = changed_fields(base.model, cfg.model)
    if changed:
        raise AxiomError(
            f"{flag}: --set and --config may change training fields only, not the model's shape of the checkpoint "
            f"({', '.join(changed)})"
        )
    return cfg


def run_config(args: argparse.Namespace) -> Config:
    """The run's config: the checkpoint's for --resume (when the run has one) and --resume-from, the model shape of
    --init-from with the preset's training fields, else the preset; the --config file, then --set, apply to each."""
    if args.resume_from and (args.resume or args.init_from):
        raise AxiomError("--resume-from excludes --resume and --init-from")
    file = config_file(args)
    start = args.resume_from
    if start is not None:
        check_resume_from_folder(Path(start))  # what to pass instead of a run's folder or of weights without state
    if start is None and args.resume:  # the one train() will pick (it names the ones it skips in train.log)
        start = newest_valid_checkpoint(Path(args.out) / "checkpoints")[0]
    if start is not None:
        return say_notices(_model_fixed(checkpoint_config(Path(start)), file, args.overrides, "--resume"), args, file)
    if args.init_from:
        saved = checkpoint_config(Path(args.init_from))
        preset = get_config(preset_of(args, file))
        cfg = _model_fixed(Config(saved.model, preset.train), file, args.overrides, "--init-from")
        return say_notices(cfg, args, file)
    return config_from_args(args)


def check_split_settings(args: argparse.Namespace, cfg: Config) -> None:
    """The split is made by axiom prepare: a val_fraction or split_seed given with --set, other than the data's, is
    refused (the run would record the data's and train on it: what was asked would not happen). A config file's are
    a record of an earlier run's, or prepare's defaults: the run records the data's (`with_data_split`)."""
    split = read_manifest(Path(args.data)).get("split", {})
    for name in ("val_fraction", "split_seed"):
        asked = any(o.partition("=")[0].strip() == name for o in args.overrides)
        if asked and split.get(name) is not None and getattr(cfg.train, name) != split[name]:
            raise AxiomError(
                f"{name}={getattr(cfg.train, name):g}: the data in {args.data} was split with {name}={split[name]:g}, "
                f"and the split is made by axiom prepare (--{name.replace('_', '-')}); leave it out, or prepare again"
            )


class _AboveTheBar(logging.Handler):
    """A log record as one terminal line above tqdm's bar: information to stdout, warnings to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr if record.levelno >= logging.WARNING else sys.stdout)


@contextlib.contextmanager
def _terminal_log() -> Iterator[None]:
    """Show what the training library logs (train.log's lines, notices) on the terminal while the command runs."""
    logger, handler = logging.getLogger("axiom.train"), _AboveTheBar()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run(args: argparse.Namespace) -> int:
    cfg = run_config(args)
    check_split_settings(args, cfg)
    init_from = Path(args.init_from) if args.init_from else None
    read_weights = hf_weights if init_from is not None and is_hf_config(read_meta(init_from)) else None
    with _terminal_log():
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
            read_weights,
        )
    if torchrun.is_first("RANK"):  # once under torchrun
        print(f"outputs in {args.out}: eval.csv, train.log, checkpoints/ (best: {args.out}/checkpoints/best)")
    return 0
