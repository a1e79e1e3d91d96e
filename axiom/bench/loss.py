"""`axiom bench loss`: the training loss alone (the output product, cross-entropy and both gradients) through each
loss kernel that runs on the device, beside the plain loss transformers' Llama computes (the whole (N, V) logits,
upcast to float32, then `F.cross_entropy`): time, peak memory and agreement, in interleaved rounds."""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from axiom.bench.timing import Bench, Contender, OwnPeak, interleaved, sync
from axiom.config import LOSS_KERNELS, Config
from axiom.errors import AxiomError
from axiom.model.fused_loss import check_loss_kernel, fused_cross_entropy
from axiom.model.loss import chunked_cross_entropy

PLAIN = "plain"  # the reference: logits materialised, as transformers' Llama computes its loss


@dataclass
class LossBench:
    """What to time: `units` forward-and-backward calls per contender and round, `rounds` rounds, after `warmup`
    untimed calls (at least one: the first, alone, gives the peak memory, loss and agreement)."""

    rows: int  # hidden states (tokens) per call: a micro-batch's tokens
    rounds: int
    warmup: int
    units: int
    seed: int


def runnable_kernels(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The loss kernels that run on `device`, and why each other one does not."""
    kernels, skipped = [], {}
    for kernel in LOSS_KERNELS:
        try:
            check_loss_kernel(kernel, device)
            kernels.append(kernel)
        except AxiomError as e:
            skipped[kernel] = str(e)
    return kernels, skipped


def loss_fn(kernel: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    if kernel == PLAIN:
        return lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t)
    if kernel == "chunked":
        return chunked_cross_entropy
    return lambda h, w, t: fused_cross_entropy(kernel, h, w, t)


def bench_loss(cfg: Config, device: torch.device, s: LossBench) -> Bench:
    """Each runnable kernel and PLAIN on (rows, d_model) hidden states and the (vocab, d_model) float32 table, under
    the run's autocast dtype on CUDA (float32 on a CPU), as `axiom train` calls its loss."""
    m = cfg.model
    torch.manual_seed(s.seed)
    hidden = torch.randn(s.rows, m.d_model, device=device).requires_grad_()
    weight = (torch.randn(m.vocab_size, m.d_model, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, m.vocab_size, (s.rows,), device=device)
    low = getattr(torch, cfg.train.dtype) if device.type == "cuda" and cfg.train.dtype != "float32" else None
    autocast = torch.autocast(device.type, dtype=low) if low is not None else contextlib.nullcontext()
    kernels, skipped = runnable_kernels(device)

    def call(kernel: str) -> tuple[Tensor, Tensor, Tensor]:
        with autocast:
            loss = loss_fn(kernel)(hidden, weight, targets)
        return (loss.detach().float(), *torch.autograd.grad(loss, (hidden, weight)))

    measured = {}
    reference = None
    for kernel in [PLAIN, *kernels]:  # the first warm-up call of each, alone: its peak memory, its values
        sync(device)
        with OwnPeak(device) as memory:
            values = call(kernel)
            sync(device)
        reference = reference or values
        measured[kernel] = {
            "peak_extra_bytes": memory.bytes,
            "loss": values[0].item(),
            **agreement(values, reference),
        }
        del values
    for _ in range(s.warmup - 1):
        for kernel in [PLAIN, *kernels]:
            call(kernel)
    contenders = [Contender(k, lambda k=k: call(k), s.rows, s.units) for k in [PLAIN, *kernels]]
    rates = interleaved(contenders, s.rounds, device)
    plain = statistics.median(rates[PLAIN])
    for kernel, figures in measured.items():
        median = statistics.median(rates[kernel])
        figures |= {"ms": 1e3 * s.rows / median, "tokens_per_s": median, "rounds_tokens_per_s": rates[kernel]}
        figures["speedup_vs_plain"] = median / plain
    dtype = str(low).removeprefix("torch.") if low is not None else "float32"
    shape = {"rows": s.rows, "vocab_size": m.vocab_size, "d_model": m.d_model, "dtype": dtype}
    return Bench({**shape, "kernels": measured, "skipped": skipped})


def agreement(values: tuple[Tensor, ...], reference: tuple[Tensor, ...]) -> dict[str, float]:
    """How far a kernel's loss and gradients lie from the reference's: the loss's absolute difference, and each
    gradient's norm of the difference relative to the reference's norm."""
    loss, *grads = values
    ref_loss, *ref_grads = reference
    out = {"loss_diff": abs(loss - ref_loss).item()}
    for name, g, r in zip(("grad_hidden", "grad_weight"), grads, ref_grads, strict=True):
        out[f"{name}_rel_diff"] = ((g.float() - r.float()).norm() / r.float().norm().clamp(min=1e-30)).item()
    return out
