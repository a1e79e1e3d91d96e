"""`axiom info`: the size and cost of a configuration and its plan for a device, without building it
(axiom/train/plan.py). `--gpu-memory-gib` plans for a GPU that is not at hand."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from axiom.cli.args import DEVICE_HELP, add_config_arguments, config_file, config_from_args, preset_of
from axiom.config import Config, ConfigFile, ModelConfig, TrainConfig
from axiom.errors import AxiomError
from axiom.runtime import default_device, pick_device
from axiom.train.plan import Plan, assumed_gpu, describe, plan_here, plan_summary, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--device", default=None, help=f"the device to plan for: {DEVICE_HELP}")
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        metavar="GIB",
        help="plan for a GPU with this much memory (an H100-class bf16 peak assumed for the predicted speed), "
        "without one at hand; implies --device cuda",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def plan(args: argparse.Namespace, cfg: Config) -> tuple[Config, Plan, str | None]:
    """The plan for what --device and --gpu-memory-gib describe: an assumed GPU, or a device of this machine (there
    with the optimizer that would train here, as `axiom train` plans it); and a fallback's notice."""
    if args.gpu_memory_gib is not None:
        if args.device is not None and not args.device.strip().lower().startswith("cuda"):
            raise AxiomError(
                f"--gpu-memory-gib plans for a GPU: it goes with --device cuda, not --device {args.device}"
            )
        if not 0 < args.gpu_memory_gib < 1e6:
            raise AxiomError(f"--gpu-memory-gib {args.gpu_memory_gib:g}: must be a number of GiB above 0, below 1e6")
        return cfg, resolve(cfg, assumed_gpu(args.gpu_memory_gib)), None
    requested = args.device or default_device()
    if requested.strip().lower().startswith("cuda") and not torch.cuda.is_available():
        raise AxiomError(f"--device {requested}: no CUDA device is visible; add --gpu-memory-gib GIB to plan for one")
    return plan_here(cfg, pick_device(requested))


def sets_every_field(file: ConfigFile) -> bool:
    def settable(config: type) -> set[str]:
        return {f.name for f in fields(config) if f.init}

    return settable(ModelConfig) <= file.model.keys() and settable(TrainConfig) <= file.train.keys()


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    cfg.check_context()  # a training plan: train would refuse it
    cfg, resolved, fallback = plan(args, cfg)
    if fallback:
        print(f"notice: {fallback}", file=sys.stderr)
    info = describe(cfg, resolved)
    if args.json:
        print(json.dumps(info))
        return
    file = config_file(args)
    if file is not None and not args.preset and file.preset is None and sets_every_field(file):
        source = f"config {file.path}"  # a run's config.json: no value comes from the default preset
    else:
        source = f"preset {preset_of(args, file)}" + (f" with {args.config}" if args.config else "")
    print(
        f"{source}: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
        f"{cfg.model.n_heads} heads / {cfg.model.n_kv_heads} KV heads of {info['head_dim']}, ffn {info['ffn_dim']}"
    )
    print(f"parameters            {info['params']:>16,}")
    print(f"non-embedding params  {info['non_embedding_params']:>16,}")
    print(f"tokens per step       {info['tokens_per_step']:>16,}")
    print(f"optimizer steps       {info['steps']:>16,}")
    print(f"planned tokens        {info['planned_tokens']:>16,}")
    print(f"FLOPs per token       {info['flops_per_token']:>16,.4g}")
    print(f"training FLOPs        {info['train_flops']:>16,.4g}")
    for line in plan_summary(cfg, resolved):
        print(f"plan: {line}")
