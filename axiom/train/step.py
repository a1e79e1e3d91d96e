"""One optimizer step, shared by the training loop and `axiom bench train`: gradient accumulation over micro-batches
(weighted by their target tokens), one gradient all-reduce per step, clipping, and no update for a bad step."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from axiom.config import TrainConfig
from axiom.errors import AxiomError, first_line
from axiom.model.loss import IGNORE_INDEX
from axiom.runtime import autocast

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (inputs, targets) micro-batches


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
    micro_batches: Batches,
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
    counts = torch.stack([(y != IGNORE_INDEX).sum() for _, y in micro_batches]).tolist()  # one sync, if any
    total_count, world = float(sum(counts)), 1
    if dist.is_initialized():
        world = dist.get_world_size()
        summed = torch.tensor([total_count], device=device, dtype=torch.float64)
        dist.all_reduce(summed)
        total_count = summed.item()
    mean_count = max(total_count, 1.0) / (n * world)  # target tokens per micro-batch, over all ranks
    total = torch.zeros((), device=device)
    # All on the device first: a copy from pageable memory may wait for the device's queue, here (idle since the last
    # step's result was read) rather than between micro-batches, where the GPU would drain while the host catches up.
    on_device = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro_batches]
    for i, (x, y) in enumerate(on_device):
        weight = counts[i] / mean_count  # exactly 1.0 for text data
        with _grad_sync(model, i == n - 1):
            with autocast(device, cfg.dtype):
                loss = model(x, y) * weight
            (loss / n).backward()
        total += loss.detach().float()
    loss = total / n
    if dist.is_initialized():  # every rank logs and judges the same mean loss
        dist.all_reduce(loss)
        loss /= dist.get_world_size()
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    loss_value, norm_value = torch.stack([loss, norm.float()]).tolist()  # the step's one wait for the device
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)) or loss_value > max_loss:
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_value, norm_value, skipped=True)
    for group in optimizer.param_groups:
        group["lr"] = lr
    try:
        optimizer.step()
    except torch.OutOfMemoryError as e:  # some parameters may be updated already: the step cannot be run again
        raise AxiomError(
            f"out of memory in the optimizer's update ({first_line(e)}): the weights, their gradients and the "
            "optimizer state do not fit together, whatever the micro-batch; shard them over several GPUs (torchrun, "
            "--set fsdp=true) or use a device with more memory"
        ) from None
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, norm_value, skipped=False)
