"""What a training configuration amounts to, without building it: parameters, tokens, FLOPs and memory (`axiom
info`), and the plan at the top of a run's train.log."""

from __future__ import annotations

import torch

from axiom.config import Config
from axiom.model.transformer import flops_per_token, num_params
from axiom.runtime import gpu_peak_flops
from axiom.train.progress import duration

OPTIMIZER_STATE_BYTES = {"adamw8bit": 2, "adamw": 8}  # per parameter: two moments, 8-bit or fp32
PLANNED_MFU = 0.4  # what a well-tuned run of this size reaches: the plan's time estimate assumes it


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


def plan_lines(cfg: Config, device: torch.device, world_size: int, optimizer_name: str) -> list[str]:
    """The model, batch, schedule, optimizer and device of a run, one train.log line each."""
    m, t = cfg.model, cfg.train
    decay = round(t.decay_fraction * t.steps)
    precision = f"{t.dtype} autocast" if device.type == "cuda" and t.dtype != "float32" else "float32"
    estimate, peak = "", gpu_peak_flops(device)
    if peak:
        seconds = flops_per_token(m, t.seq_len) * t.planned_tokens / (PLANNED_MFU * peak * world_size)
        estimate = f"; about {duration(seconds)} at {PLANNED_MFU:.0%} MFU"
    return [
        f"model        {num_params(m):,} parameters ({num_params(m, non_embedding=True):,} non-embedding): "
        f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads / {m.n_kv_heads} KV heads",
        f"batch        {t.micro_batch_size} x {t.seq_len} tokens x {t.grad_accum_steps} micro-batches "
        f"({world_size} process{'es' if world_size > 1 else ''}) = {t.tokens_per_step:,} tokens per step",
        f"schedule     {t.steps:,} steps = {t.planned_tokens:,} tokens; warmup {t.warmup_steps:,}, "
        f"lr {t.lr_max:g} constant, cosine to {t.lr_min:g} over the last {decay:,} steps",
        f"optimizer    {optimizer_name}, betas ({t.beta1}, {t.beta2}), weight decay {t.weight_decay} on matrices",
        f"device       {device} x {world_size}, {precision}{estimate}",
    ]
