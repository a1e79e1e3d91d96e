"""The training loss through other projects' fused Triton kernels: liger-kernel's fused linear cross-entropy and
Apple's cut-cross-entropy. Each computes the output product and the cross-entropy together without holding the
(N, V) logits, as our chunked loss (axiom/model/loss.py) does in PyTorch ops. They run on CUDA (Triton); a CPU takes
them only under Triton's interpreter (TRITON_INTERPRET=1), which is how the suite checks liger-kernel on a CPU.

Optional: `pip install 'axiom-lm[kernels]'`, imported only when chosen (`--set loss_kernel=liger|cce`). Which
kernel `auto` picks per device is `axiom.train.plan.AUTO_LOSS_KERNEL`, from `axiom bench loss` on that device.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from axiom.errors import AxiomError, require_installed
from axiom.model.loss import IGNORE_INDEX, default_vocab_multiple, padded_vocab

# each of axiom.config.LOSS_KERNELS but ours -> the module it imports (the kernels extra installs both)
FUSED_KERNELS = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}


def check_loss_kernel(kernel: str, device: torch.device) -> None:
    """Raise a one-line AxiomError where a fused `kernel` cannot run on `device`: its package is missing, or the
    device is not a GPU (and Triton's interpreter is not asked for). Ours runs everywhere."""
    if kernel not in FUSED_KERNELS:
        return
    # found, not imported: the loss imports it (and Triton) when it first runs
    require_installed(FUSED_KERNELS[kernel], f"loss_kernel={kernel}", "axiom-lm[kernels]", "--set loss_kernel=chunked")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise AxiomError(
            f"loss_kernel={kernel} runs Triton kernels on CUDA only; on {device.type} use --set loss_kernel=chunked "
            "(or auto)"
        )


def fused_cross_entropy(
    kernel: str,
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    ignore_index: int = IGNORE_INDEX,
    vocab_multiple: int | None = None,
) -> Tensor:
    """Mean cross-entropy of `hidden @ weight.T` (hidden (N, d), weight (V, d), targets (N,)) through `kernel`;
    `vocab_multiple` as in `chunked_cross_entropy` (liger only: CCE never forms a logits row).

    Under autocast both operands are cast to its dtype first: the kernels are autograd Functions whose Triton code
    autocast does not reach (the table's gradient still flows back to its float32 parameter through the cast)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        low = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(low), weight.to(low)
    if kernel == "liger":
        multiple = default_vocab_multiple(device_type) if vocab_multiple is None else vocab_multiple
        return _liger(hidden, weight, targets, ignore_index, multiple)
    if kernel == "cce":
        from cut_cross_entropy import linear_cross_entropy

        # CCE's own default gradient filter ("high"): entries of softmax - one_hot below bf16's resolution skipped.
        return linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, impl="cce")
    raise ValueError(f"fused_cross_entropy: unknown kernel {kernel!r} (one of {', '.join(FUSED_KERNELS)})")


def _liger(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, vocab_multiple: int) -> Tensor:
    """liger-kernel's loss, its output product over the vocabulary padded to `vocab_multiple` as ours is on a GPU
    (liger materialises each chunk's logits with a cuBLAS product, which an unaligned 100,277-column row sends to a
    slow kernel); a bias of -inf on the padded columns gives them no probability and no gradient."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    V = weight.shape[0]
    Vp = padded_vocab(V, vocab_multiple)
    bias = None
    if Vp > V:
        weight = F.pad(weight, (0, 0, 0, Vp - V))  # differentiable: the padded rows' gradient is dropped
        bias = torch.zeros(Vp, device=weight.device, dtype=weight.dtype)
        bias[V:] = -math.inf
    return liger_fused_linear_cross_entropy(
        hidden, weight, targets, bias=bias, ignore_index=ignore_index, accum_dtype=torch.float32
    )
