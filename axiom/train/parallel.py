"""Processes, devices and model wrapping: everything that differs between one CPU and many GPUs.

`parallelize` applies activation checkpointing, torch.compile and DDP or FSDP2 to a built model, in one place, so
model.py stays plain modules. Under FSDP the full (unsharded) weights and optimizer state are gathered for
checkpoints and scattered back on resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from axiom import torchrun
from axiom.config import AUTO, TrainConfig
from axiom.model.transformer import Axiom, retie

T = TypeVar("T")


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the processes on this machine

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL on GPUs, gloo on CPUs."""
    if torchrun.count("WORLD_SIZE", "1") == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = torchrun.count("LOCAL_RANK", "0"), torchrun.count("LOCAL_WORLD_SIZE", "1")
    return Dist(dist.get_rank(), dist.get_world_size(), *local)


def from_main(d: Dist, decide: Callable[[], T]) -> T:
    """`decide()` on rank 0, its result (or the error it raised) passed to every rank: a choice every rank must make
    alike, such as the checkpoint to resume, where rank 0 is changing what the choice reads (a kill's leftovers
    being put back) or files may differ between ranks' views."""
    if d.world_size == 1:
        return decide()
    outcome: list = [None, None]
    if d.main:
        try:
            outcome[0] = decide()
        except Exception as e:  # sent on, so that no rank waits for a result that never comes
            outcome[1] = e
    dist.broadcast_object_list(outcome, src=0)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def parallelize(model: Axiom, cfg: TrainConfig, device: torch.device, d: Dist) -> torch.nn.Module:
    """Activation checkpointing, torch.compile and DDP/FSDP2 applied from outside the model, in one place.

    torch.compile goes region by region, as torchtitan does: each block, the final norm and each chunk of the loss.
    The blocks share one code path, so the first block's graph serves all of them and compiling costs about one
    layer's time whatever the depth; the loss's chunk loop stays in Python, so the micro-batch does not unroll
    into the graph either (a whole-model graph of axiom-380m at micro-batch 80 had not finished compiling after
    minutes on an H200 machine). Compiling in place (`Module.compile`) keeps parameter names, so checkpoints look
    the same. `cfg` is planned (axiom/train/plan.py): "auto" would read as true."""
    if AUTO in (cfg.gradient_checkpointing, cfg.compile, cfg.loss_kernel):
        raise ValueError("parallelize: plan the config first (axiom.train.plan.resolve): a setting is still auto")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.loss_kernel = cfg.loss_kernel
    if cfg.compile:
        for block in model.layers:
            block.compile()
        model.norm.compile()
        model.compiled_loss = True
    if d.world_size == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def full_state(model: Axiom, optimizer: torch.optim.Optimizer | None, fsdp: bool) -> tuple[dict, dict | None]:
    """Full (unsharded, CPU) weights and optimizer state; under FSDP every rank must call this."""
    if not fsdp:
        return model.state_dict(), optimizer.state_dict() if optimizer is not None else None
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=opts)
    return weights, get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None


def set_model_state(model: Axiom, weights: dict, fsdp: bool) -> None:
    """Load full weights (a checkpoint's, the tied table stored once) into a live model; under FSDP every rank
    calls this and rank 0's tensors are scattered."""
    weights = retie(weights, model.cfg.tie_embeddings)
    if not fsdp:
        model.load_state_dict(weights)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=opts)


def load_optimizer_state(model: Axiom, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=keyed_by_name(model, optimizer, state), options=opts)


def keyed_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state as FSDP's loader reads it: keyed by parameter name. One process and DDP save
    `Optimizer.state_dict()`, keyed by each parameter's place in the optimizer's groups, which FSDP's loader took
    without a word and matched to nothing (AdamW restarted from zero moments, and the next save failed)."""
    groups = state.get("param_groups", [])
    if not any(isinstance(i, int) for group in groups for i in group["params"]):
        return state  # saved under FSDP
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    return {
        "state": {order[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in groups],
    }
