"""The card's optimizer and learning-rate schedule: `lr_at` and `build_optimizer` (AdamW8bit, else torch AdamW)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import torch

from axiom.config import TrainConfig
from axiom.errors import AxiomError, first_line

logger = logging.getLogger(__name__)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr_max over warmup_steps, constant,
    then a cosine from lr_max to lr_min over the last decay_fraction of the steps (the last step uses lr_min)."""
    steps = cfg.steps
    decay_steps = round(cfg.decay_fraction * steps)
    decay_start = steps - decay_steps
    if step >= decay_start and decay_steps > 0:
        progress = (step - decay_start) / (decay_steps - 1) if decay_steps > 1 else 1.0  # one step: lr_min
        lr = cfg.lr_min + 0.5 * (cfg.lr_max - cfg.lr_min) * (1 + math.cos(math.pi * min(progress, 1.0)))
    else:
        lr = cfg.lr_max
    if step < cfg.warmup_steps:
        lr = min(lr, cfg.lr_max * (step + 1) / cfg.warmup_steps)
    return lr


def schedule_jump(saved: TrainConfig, cfg: TrainConfig, step: int) -> str | None:
    """Why the LR of a resumed run's next step differs from what its checkpoint's schedule gives (`--set
    max_steps=N` on a finished run warms it back up to lr_max), with the setting that continues from the
    checkpoint's LR instead; None when it does not differ."""
    before, after = lr_at(step, saved), lr_at(step, cfg)
    if math.isclose(before, after, rel_tol=1e-9):
        return None
    line = (
        f"the LR jumps from {before:g} to {after:g} at step {step:,}: the schedule is a function of the run's length "
        "and settings, which the resumed run changed"
    )
    if cfg.lr_min <= before and math.isclose(lr_at(step, dataclasses.replace(cfg, lr_max=before)), before):
        line += f"; to continue from {before:g} instead: --set lr_max={before:g}"
    return line + " (docs/training.md#extending-a-finished-run)"


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every matrix (attention, MLP, and the tied embedding/output table); none on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied table appears once
    matrices, gains = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    decays = group_weight_decays(weight_decay)
    return [{"params": group, "weight_decay": decay} for group, decay in zip((matrices, gains), decays, strict=True)]


def group_weight_decays(weight_decay: float) -> tuple[float, float]:
    """The weight decay of `param_groups`' two groups: the matrices', then the norm gains' (none)."""
    return weight_decay, 0.0


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """The config's betas and weight decay in every parameter group. `load_state_dict` brings back a checkpoint's,
    so a run resumed with other values would otherwise train on with the old ones (the LR is set at every step)."""
    for group, decay in zip(optimizer.param_groups, group_weight_decays(cfg.weight_decay), strict=True):
        group["betas"], group["weight_decay"] = (cfg.beta1, cfg.beta2), decay


def adamw8bit_unusable(device: torch.device, fsdp: bool = False) -> str | None:
    """Why bitsandbytes' AdamW8bit cannot train here (missing, failing a probe step on this device, or FSDP's
    shards), or None when it can."""
    if fsdp:
        return "FSDP shards need torch AdamW"
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its warnings concern 4-bit kernels we never use
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes is not usable ({type(e).__name__}: {first_line(e)[:80]})"
    return _adamw8bit_step_fails(device)


@functools.cache  # once a process: planning and building the optimizer both ask
def _adamw8bit_step_fails(device: torch.device) -> str | None:
    import bitsandbytes as bnb

    try:
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))  # 8-bit state starts at 4096 elements
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe]).step()
    except Exception as e:
        return f"bitsandbytes AdamW8bit fails on {device.type} ({type(e).__name__})"
    return None


def runnable_optimizer(cfg: TrainConfig, device: torch.device, fsdp: bool) -> tuple[TrainConfig, str | None]:
    """`cfg` with the optimizer that will train: torch AdamW where AdamW8bit is asked for and cannot run; and the
    notice saying so. Planned before the run, so that memory is planned for the optimizer state it will hold."""
    why = adamw8bit_unusable(device, fsdp) if cfg.optimizer == "adamw8bit" else None
    if why is None:
        return cfg, None
    return dataclasses.replace(cfg, optimizer="adamw"), f"{why}; using torch AdamW instead of AdamW8bit"


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device | str, fsdp: bool = False
) -> tuple[torch.optim.Optimizer, str]:
    """The card's optimizer: AdamW8bit when asked for and usable, else torch AdamW (fused on CPU and CUDA).

    Returns (optimizer, description); a fallback is logged as one warning, a "notice: " line."""
    device = torch.device(device)
    groups = param_groups(model, cfg.weight_decay)
    cfg, fallback = runnable_optimizer(cfg, device, fsdp)
    if fallback:
        logger.warning("notice: %s", fallback)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(groups, lr=cfg.lr_max, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        return opt, "AdamW8bit (bitsandbytes)"
    # One fused kernel per parameter group instead of a dozen ops per tensor.
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(groups, lr=cfg.lr_max, betas=(cfg.beta1, cfg.beta2), fused=fused or None)
    return opt, "AdamW (torch, fused)" if fused else "AdamW (torch)"


def resumable_config(cfg: TrainConfig, saved_optimizer: str | None) -> TrainConfig:
    """`cfg` with the optimizer a checkpoint's state belongs to (`saved_optimizer`, its state.pt's name): a run that
    fell back to torch AdamW continues with torch AdamW where AdamW8bit would work now (the state has no 8-bit
    moments, and the run goes on as it was trained)."""
    if cfg.optimizer == "adamw8bit" and saved_optimizer is not None and not saved_optimizer.startswith("AdamW8bit"):
        logger.warning(
            "notice: the checkpoint holds %s's state (the run fell back to it); continuing with it", saved_optimizer
        )
        return dataclasses.replace(cfg, optimizer="adamw")
    return cfg


def check_optimizer_state_loads(saved_optimizer: str | None, built: str, where: str, fsdp: bool = False) -> None:
    """A checkpoint of AdamW8bit's 8-bit state cannot continue in torch AdamW: a clear error, not a KeyError."""
    if saved_optimizer is None or not saved_optimizer.startswith("AdamW8bit") or built.startswith("AdamW8bit"):
        return
    if fsdp:
        way = "FSDP shards need torch AdamW: leave FSDP out (--set fsdp=false: DDP or one process)"
    else:
        way = "bitsandbytes is not usable here (see the notice above); install it (pip install 'axiom-lm[bnb]')"
    raise AxiomError(
        f"{where}: the run was trained with {saved_optimizer}, whose state torch AdamW cannot take, and {way} to "
        "resume, or start a new run from these weights with --init-from"
    )
