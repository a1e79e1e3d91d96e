"""`axiom bench train`: `axiom.train.step.train_step` (the training loop's own step: forward, backward, clipping,
optimizer) timed on synthetic token ids, optionally beside transformers' Llama given the same shapes, dtype, weights,
batch, optimizer and loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from axiom.bench.reference import llama_like, seeded_model
from axiom.bench.timing import (
    Bench,
    Contender,
    OwnPeak,
    interleaved,
    peak_memory,
    profile_table,
    reset_peak,
    summary,
)
from axiom.config import Config, ModelConfig, TrainConfig
from axiom.model.fused_loss import check_loss_kernel
from axiom.model.transformer import flops_per_token, num_params
from axiom.train.optim import build_optimizer, lr_at
from axiom.train.parallel import Dist, parallelize
from axiom.train.plan import plan_here
from axiom.train.step import Batches, train_step


@dataclass
class TrainBench:
    """What to time: `steps` optimizer steps per round for `rounds` rounds, after `warmup` untimed steps."""

    rounds: int
    warmup: int
    steps: int
    seed: int  # of the weights and the synthetic token ids
    vs_hf: bool
    profile: bool


class LlamaLoss(torch.nn.Module):
    """A Llama behind our call signature, model(x, y) -> mean cross-entropy of predicting y, so that the one
    `train_step` drives both models. `shift_labels` makes transformers use y as given (x and y are already
    shifted by one), so both losses cover the same tokens."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def bench_train(cfg: Config, device: torch.device, s: TrainBench) -> Bench:
    cfg, plan, _ = plan_here(cfg, device)
    cfg = plan.applied(cfg)  # settings left to auto, as `axiom train` plans them
    m, t = cfg.model, cfg.train
    check_loss_kernel(t.loss_kernel, device)
    cfg.check_context()
    shape = (t.grad_accum_steps, t.micro_batch_size, t.seq_len + 1)
    tokens = torch.randint(0, m.vocab_size, shape, generator=torch.Generator().manual_seed(s.seed))
    batches = [(row[:, :-1].contiguous().to(device), row[:, 1:].contiguous().to(device)) for row in tokens]

    model = seeded_model(m, s.seed).to(device)
    model.ignored_targets = False  # synthetic ids, like text: as the trainer runs it
    model = parallelize(model, t, device, Dist())
    reset_peak(device)
    ours = Warmed(model, t, device, batches, s.warmup)
    peak = peak_memory(device)  # before the reference exists: ours alone
    contenders = [Contender("axiom", ours.step, t.tokens_per_step, s.steps)]
    extra = {}
    if s.vs_hf:
        model.loss_workspace.release()  # our kept loss block is not the reference's memory
        weights = seeded_model(m, s.seed).state_dict()  # the same weights, made once ours is measured
        theirs, extra = hf_contender(m, t, device, weights, batches, s)
        contenders.append(theirs)
    rates = interleaved(contenders, s.rounds, device)
    figures = {
        **summary(rates, flops_per_token(m, t.seq_len), device),
        "peak_mem_bytes": peak,
        "first_loss": ours.first_loss,
        "params": num_params(m),
        **extra,
        "tokens_per_step": t.tokens_per_step,
        "micro_batch_size": t.micro_batch_size,
        "seq_len": t.seq_len,
        "grad_accum_steps": t.grad_accum_steps,
        "optimizer": ours.optimizer_name,
        "dtype": t.dtype if device.type == "cuda" else "float32",
        "compile": t.compile,
        "gradient_checkpointing": t.gradient_checkpointing,
        "steps_per_round": s.steps,
    }
    return Bench(figures, profile_table(ours.step) if s.profile else None)


def hf_contender(
    m: ModelConfig, t: TrainConfig, device: torch.device, weights: dict, batches: Batches, s: TrainBench
) -> tuple[Contender, dict]:
    """transformers' Llama with our weights, trained by the same `train_step`, warmed up; and its first loss,
    parameters and own peak memory (its weights, optimizer state and activations)."""
    with OwnPeak(device) as memory:
        hf = LlamaLoss(llama_like(m, device, weights))
        if t.gradient_checkpointing:  # newer transformers renamed gradient_checkpointing_enable
            getattr(hf.hf, "activation_checkpointing_enable", hf.hf.gradient_checkpointing_enable)()
        if t.compile:
            hf.compile()
        hf.train()
        theirs = Warmed(hf, t, device, batches, s.warmup)
    extra = {
        "hf_peak_mem_bytes": memory.bytes,
        "hf_first_loss": theirs.first_loss,
        "hf_params": sum(p.numel() for p in hf.parameters()),
    }
    return Contender("hf", theirs.step, t.tokens_per_step, s.steps), extra


class Warmed:
    """A model trained by `train_step` for `warmup` untimed steps (at least one: its loss is `first_loss`);
    `step()` then takes one more, the LR following the schedule from step 0."""

    def __init__(self, model: torch.nn.Module, t: TrainConfig, device: torch.device, batches: Batches, warmup: int):
        self.model, self.t, self.batches = model, t, batches
        self.optimizer, self.optimizer_name = build_optimizer(model, t, device)
        self.steps = 0
        self.first_loss = train_step(model, self.optimizer, batches, lr_at(0, t), t).loss
        for _ in range(warmup - 1):
            self.step()

    def step(self) -> None:
        train_step(self.model, self.optimizer, self.batches, lr_at(self.steps, self.t), self.t)
        self.steps += 1
