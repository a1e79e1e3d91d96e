"""`axiom info`: the size and cost of a configuration, without building it (axiom/train/plan.py)."""

from __future__ import annotations

import argparse
import json

from axiom.cli.args import add_config_arguments, config_file, config_from_args, preset_of
from axiom.train.plan import describe, training_memory_bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> None:
    cfg = config_from_args(args)
    info = describe(cfg)
    if args.json:
        print(json.dumps(info))
        return
    mem = training_memory_bytes(cfg)
    source = preset_of(args, config_file(args)) + (f" with {args.config}" if args.config else "")
    print(
        f"preset {source}: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
        f"{cfg.model.n_heads} heads / {cfg.model.n_kv_heads} KV heads of {info['head_dim']}, ffn {info['ffn_dim']}"
    )
    print(f"parameters            {info['params']:>16,}")
    print(f"non-embedding params  {info['non_embedding_params']:>16,}")
    print(f"tokens per step       {info['tokens_per_step']:>16,}")
    print(f"optimizer steps       {info['steps']:>16,}")
    print(f"planned tokens        {info['planned_tokens']:>16,}")
    print(f"FLOPs per token       {info['flops_per_token']:>16,.4g}")
    print(f"training FLOPs        {info['train_flops']:>16,.4g}")
    detail = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in mem.items() if k != "total")
    print(f"training memory (est) {mem['total'] / 2**30:>13.2f} GiB ({detail})")
