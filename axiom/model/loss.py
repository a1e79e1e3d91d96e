"""The output layer's arithmetic: logits for a few rows on CPU, and the chunked cross-entropy that never holds
(N, V) float32 logits, over a vocabulary padded to a multiple of 128 on a GPU."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # a target the loss leaves out (masked chat tokens, padding)
# The loss's output product runs over the vocabulary padded to a multiple of this on a GPU: cl100k_base's 100,277
# columns make a bf16 logits row 200,554 bytes, not 16-byte aligned, and cuBLAS then falls back to slow kernels
# (docs/benchmarks.md, "Aligned output products"). The parameter and everything stored keep the true vocabulary.
VOCAB_MULTIPLE = 128
# Rows per chunk of the loss: on a GPU each chunk adds its share into the (V, d) float32 table gradient, a pass over
# 411 MB at the card's size, so fewer, larger chunks (1.6 GB of bf16 logits and gradient each); on a CPU a chunk's
# float32 block (411 MB at 1024 rows) is what the memory holds.
CHUNK_ROWS = {"cuda": 4096}
DEFAULT_CHUNK_ROWS = 1024


def chunk_rows(device_type: str) -> int:
    """Rows per chunk of the loss on a device of this type (CHUNK_ROWS, else DEFAULT_CHUNK_ROWS)."""
    return CHUNK_ROWS.get(device_type, DEFAULT_CHUNK_ROWS)


def default_vocab_multiple(device_type: str) -> int:
    """What the loss pads the vocabulary to a multiple of on a device of this type: VOCAB_MULTIPLE on a GPU, where
    the alignment pays; 1, no padding, on a CPU, where the table's copy would cost and gain nothing."""
    return VOCAB_MULTIPLE if device_type == "cuda" else 1


def padded_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """`vocab_size` rounded up to a multiple of `multiple` (100,277 -> 100,352)."""
    return -(-vocab_size // multiple) * multiple


def output_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., d) @ weight.T -> logits (..., V).

    On CPU a handful of rows (decoding) takes MKL's matrix-vector path, which runs on one core far below
    memory bandwidth; the same dot products as a batched matmul over row blocks of the table use every core
    (docs/benchmarks.md, "Few-row logits on CPU")."""
    rows, (V, d) = x.numel() // x.shape[-1], weight.shape
    if x.device.type != "cpu" or rows > 16:  # MKL's matrix-matrix path is efficient on its own
        return F.linear(x, weight)
    blocks = row_blocks(V)
    xt = x.reshape(rows, d).t()  # (d, rows)
    per = V // blocks
    out = torch.bmm(weight[: blocks * per].view(blocks, per, d), xt.expand(blocks, d, rows))  # (blocks, per, rows)
    out = out.permute(2, 0, 1).reshape(rows, blocks * per)
    if blocks * per < V:  # a vocabulary without a divisor in range: the last rows separately
        out = torch.cat([out, xt.t() @ weight[blocks * per :].t()], dim=1)
    return out.view(*x.shape[:-1], V)


def row_blocks(V: int) -> int:
    """A block count in [16, 256] that divides V (100,277 = 149 x 673), so no remainder needs copying in;
    16 otherwise."""
    return next((b for b in range(16, 257) if V % b == 0), 16)


class LossWorkspace:
    """The chunked loss's (n, V) float32 block on CPU, kept between steps by its owner (each `Axiom` has one).

    glibc hands blocks this large back to the OS on free, so a fresh block of hundreds of MB per step would cost a
    page fault per 4 KB plus kernel zeroing (docs/benchmarks.md, "Chunked loss on CPU keeps its block"). The block
    is taken out while in use, so a concurrent caller simply allocates its own."""

    def __init__(self) -> None:
        self.block: Tensor | None = None

    def take(self, numel: int) -> Tensor:
        """The kept block if it holds `numel` values, else a new one; the workspace is empty until `keep`."""
        block, self.block = self.block, None
        return block if block is not None and block.numel() >= numel else torch.empty(numel, dtype=torch.float32)

    def keep(self, block: Tensor) -> None:
        self.block = block

    def release(self) -> None:
        """Free the kept block (a new one is made at the next CPU training step)."""
        self.block = None


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` without holding (N, V) fp32 logits.

    The forward pass walks the rows in chunks, and for each chunk computes the loss and at once its
    gradients with respect to the hidden states and the weight (softmax - one_hot). Backward then only
    scales the stored gradients, so no logits are kept and none are recomputed.

    Each chunk touches one (n, V) fp32 block only: log-softmax and exp run in place on it, and the
    per-row factor valid / n_valid is applied to the small (n, d) operands instead of the block.
    Under autocast the table is cast to the low-precision dtype once, not once per chunk and matmul.

    With `vocab_multiple` > 1 the table is zero-padded to a multiple of it (the copy that casts it under autocast)
    and the padded columns' logits are -inf: they take no probability and get no gradient, so the loss and both
    gradients are those of the unpadded product; the table's gradient keeps the true vocabulary.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk: int,
        ignore_index: int,
        workspace: LossWorkspace | None,
        vocab_multiple: int,
        compiled: bool,
    ) -> Tensor:
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        device_type = hidden.device.type
        low = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        V = weight.shape[0]
        w = padded_table(weight, low, padded_vocab(V, vocab_multiple))  # (Vp, d)
        Vp = w.shape[0]
        # Over the padded rows too (their gradient is zero), so the table's gradient product stays aligned as well.
        grad_weight = (
            torch.zeros((Vp, w.shape[1]), device=w.device, dtype=torch.float32) if weight.requires_grad else None
        )
        fp32_cpu = device_type == "cpu" and low is None and hidden.dtype == weight.dtype == torch.float32
        block = workspace.take(min(chunk, hidden.shape[0]) * Vp) if fp32_cpu and workspace is not None else None
        step = compiled_chunk_loss() if compiled else chunk_loss
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            h = h.to(low) if low is not None else h
            out = block[: len(t) * Vp].view(len(t), Vp) if block is not None else None
            part, gh = step(h, w, t, V, ignore_index, n_valid, grad_weight, grad_hidden is not None, low is None, out)
            loss += part
            if gh is not None:
                grad_hidden[s : s + chunk] = gh
        if block is not None:
            workspace.keep(block)
        # Kept on ctx, not saved for backward: they are this function's own buffers, scaled in place once.
        ctx.grads = (grad_hidden, grad_weight[:V] if grad_weight is not None else None)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.grads is None:
            raise RuntimeError("chunked_cross_entropy supports one backward pass per forward (no retain_graph)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        # In place: no second (V, d) table of gradients allocated per step.
        gh = grad_hidden.mul_(grad_out.to(grad_hidden.dtype)) if grad_hidden is not None else None
        gw = grad_weight.mul_(grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None, None, None


def padded_table(weight: Tensor, dtype: torch.dtype | None, rows: int) -> Tensor:
    """`weight` (V, d) in `dtype` (None: its own) with zero rows appended up to `rows`: one copy where a cast makes
    one anyway, none where nothing changes."""
    dtype = dtype or weight.dtype
    if rows == weight.shape[0]:
        return weight.to(dtype)
    table = weight.new_zeros((rows, weight.shape[1]), dtype=dtype)
    table[: weight.shape[0]] = weight
    return table


def chunk_loss(
    h: Tensor,
    w: Tensor,
    t: Tensor,
    vocab: int,
    ignore_index: int,
    n_valid: Tensor,
    grad_weight: Tensor | None,
    want_grad_hidden: bool,
    fp32: bool,
    block: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """One chunk of rows h (n, d) against the table w (Vp, d, the first `vocab` rows real): the chunk's summed loss
    and, with gradients asked for, d(mean loss)/dh, returned, and d(mean loss)/dw, added to `grad_weight` (Vp, d,
    fp32). `block`: an (n, Vp) float32 buffer the logits are computed in (the CPU's kept block), else a fresh one."""
    rows = torch.arange(len(t), device=t.device)
    valid = t != ignore_index
    safe_t = t.clamp(min=0)
    logp = torch.mm(h, w.t(), out=block) if block is not None else (h @ w.t()).float()  # (n, Vp)
    if w.shape[0] > vocab:
        logp[:, vocab:] = -math.inf  # padded columns: no probability, so no gradient
    torch.log_softmax(logp, dim=-1, out=logp)
    target_logp = logp[rows, safe_t]  # (n,), gathered before the block is overwritten
    loss = -(target_logp * valid).sum()
    if grad_weight is None and not want_grad_hidden:
        return loss, None
    # d(mean loss)/d logits = (softmax - one_hot) * valid / n_valid. Under autocast the softmax is written in the
    # low precision as it is computed (one pass over the float32 block, not an in-place exp and then a cast), each
    # target's entry p - 1 taken in float32 first: near p = 1 a rounded p would lose it.
    g = logp.exp_() if logp.dtype == h.dtype else torch.exp(logp, out=torch.empty_like(logp, dtype=h.dtype))
    g[rows, safe_t] = (target_logp.exp() - 1.0).to(h.dtype)
    del logp  # under autocast g is a low-precision copy: free the fp32 block before the matmuls
    scale = (valid / n_valid).to(h.dtype)[:, None]  # (n, 1)
    if grad_weight is not None:
        hs = h * scale
        if fp32:
            grad_weight.addmm_(g.t(), hs)  # accumulates without a (V, d) temporary
        else:
            grad_weight += g.t() @ hs  # low-precision product, fp32 sum, no fp32 (V, d) temporary
    return loss, (g @ w) * scale if want_grad_hidden else None  # the padded rows of w are zero


@functools.cache
def compiled_chunk_loss() -> Callable:
    """`chunk_loss` through torch.compile: the float32 cast, mask, log-softmax, exp and one-hot of a chunk fused into
    a few kernels that never hold the (n, Vp) float32 logits. One graph for every chunk, and for every layer count:
    the model's loss loop stays in Python, so compiling does not grow with the micro-batch."""
    return torch.compile(chunk_loss)


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    *,
    workspace: LossWorkspace | None = None,
    vocab_multiple: int | None = None,
    compiled: bool = False,
) -> Tensor:
    """Mean cross-entropy of logits `hidden @ weight.T` (hidden (N, d), weight (V, d), targets (N,)). `workspace`:
    where a float32 CPU call keeps its (n, V) block for the next (eager mode only); without, each call makes its
    own. `vocab_multiple`: the product runs over the vocabulary padded to a multiple of it (default:
    `default_vocab_multiple` of the device); the result is the same up to rounding. `chunk`: rows per chunk
    (default: `chunk_rows` of the device). `compiled`: each chunk through `compiled_chunk_loss`. With gradients
    off (evaluation) the loss alone: no gradient is computed for a backward that cannot come."""
    if vocab_multiple is None:
        vocab_multiple = default_vocab_multiple(hidden.device.type)
    if chunk is None:
        chunk = chunk_rows(hidden.device.type)
    if not torch.is_grad_enabled():  # evaluation: the table still requires grad, but no backward will come
        hidden, weight = hidden.detach(), weight.detach()
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index, workspace, vocab_multiple, compiled)
