"""`axiom info`: the size and cost of a configuration, without building it."""

from __future__ import annotations

import argparse
import json

from axiom.cli.args import add_config_arguments, config_from_args
from axiom.config import Config
from axiom.model.transformer import flops_per_token, num_params

OPTIMIZER_STATE_BYTES = {"adamw8bit": 2, "adamw": 8}  # per parameter: two moments, 8-bit or fp32


def training_memory_bytes(cfg: Config) -> dict[str, int]:
    """Rough peak training memory per device: fp32 weights and grads, optimizer state, activations
    (only each block's input kept under activation checkpointing, plus one block being recomputed,
    ~34 bytes per token per hidden unit in bf16 without attention scores since SDPA uses flash/efficient
    kernels) and the chunked loss (one 1024-row fp32 logit chunk, its gradient, and an fp32 weight grad)."""
    m, t = cfg.model, cfg.train
    n = num_params(m)
    act_bytes = 2 if t.dtype != "float32" else 4
    tokens = t.micro_batch_size * t.seq_len
    per_block = 17 * act_bytes * tokens * m.d_model
    kept = (
        m.n_layers * act_bytes * tokens * m.d_model + per_block if t.gradient_checkpointing else m.n_layers * per_block
    )
    loss = 2 * 4 * min(tokens, 1024) * m.vocab_size + 4 * m.vocab_size * m.d_model
    parts = {
        "weights": 4 * n,
        "grads": 4 * n,
        "optimizer": OPTIMIZER_STATE_BYTES[t.optimizer] * n,
        "activations": kept,
        "loss": loss,
    }
    parts["total"] = sum(parts.values())
    return parts


def describe(cfg: Config) -> dict:
    m, t = cfg.model, cfg.train
    return {
        "params": num_params(m),
        "non_embedding_params": num_params(m, non_embedding=True),
        "head_dim": m.head_dim,
        "ffn_dim": m.ffn_dim,
        "tokens_per_step": t.tokens_per_step,
        "steps": t.steps,
        "planned_tokens": t.planned_tokens,
        "flops_per_token": flops_per_token(m, t.seq_len),
        "train_flops": flops_per_token(m, t.seq_len) * t.planned_tokens,
        "train_memory_bytes": training_memory_bytes(cfg)["total"],
    }


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
    print(
        f"preset {args.preset}: d_model {cfg.model.d_model}, {cfg.model.n_layers} layers, "
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
