"""Axiom-Dense: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings).

Plain modules only: no training, data or distributed code. Activation checkpointing is a flag of the
model so the block loop stays one loop; compile and DDP/FSDP wrapping are applied from outside.

Weight layout follows Hugging Face Llama (rotate-half RoPE), so export is a rename plus splitting the
fused projections: `qkv_proj` = [q_proj; k_proj; v_proj] and `gate_up_proj` = [gate_proj; up_proj]
stacked along the output dimension.

The tied table is handled here and nowhere else: `tie` makes lm_head.weight the embedding itself, `untie` leaves
it out of stored tensors, `retie` puts it back for loading them. The KV cache is in cache.py, the output layer's
loss and logits in loss.py.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import checkpoint

from axiom.config import ModelConfig
from axiom.errors import AxiomError
from axiom.model.cache import KVCache
from axiom.model.fused_loss import fused_cross_entropy
from axiom.model.loss import IGNORE_INDEX, LossWorkspace, chunked_cross_entropy, output_logits

log = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:
            # Training's residual stream (fp32 under autocast): the same sums as below in torch's fused kernel on a
            # GPU, one kernel each way where the ops below are five forward and more backward, eager.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in fp32, cast back, then scale: the order Hugging Face Llama uses, so exports match.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (max_len, head_dim), in fp32, in the rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, T, hd); cos/sin broadcast to it."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        qkv_out = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.d_model, qkv_out, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: KVCache | None = None,
        layer: int = 0,
        mask: Tensor | BlockMask | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        nh, nkv = self.n_heads, self.n_kv_heads
        heads = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim)
        if heads.requires_grad and cache is None and not torch.compiler.is_compiling():  # eager training
            q, k, v = (t.transpose(1, 2) for t in _RotaryQKV.apply(heads, cos, sin, nh, nkv))
        else:  # inductor fuses the plain ops; decoding has no backward
            # One RoPE call rotates query and key heads together: half the kernels of rotating them apart.
            qk, v = heads.split([nh + nkv, nkv], dim=2)
            q, k = apply_rope(qk.transpose(1, 2), cos, sin).split([nh, nkv], dim=1)  # (B, nh, T, hd), (B, nkv, T, hd)
            v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        gqa = self.n_kv_heads != self.n_heads
        if isinstance(mask, BlockMask):  # a compiled step over a static cache (`filled_slots_mask`)
            y = flex_attention(q, k, v, block_mask=mask, enable_gqa=gqa)
        else:  # causal within a fresh sequence; a cached step brings its own mask (or none for one new token)
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None and T > 1,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=gqa,
            )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class _RotaryQKV(torch.autograd.Function):
    """The rotated queries and keys and the values, (B, T, heads, hd) each, of a fused projection's heads (B, T,
    nh + 2 nkv, hd) under tables cos/sin (T, hd): `apply_rope`'s values and autograd's gradients bit for bit. Its
    backward writes the three gradients straight into one tensor shaped like the heads, where autograd joined the
    query and key gradients with a cat, then those with the values' with another, after RoPE's backward made its own
    cat of the two halves (docs/benchmarks.md, "The second GPU check")."""

    @staticmethod
    def forward(ctx, heads: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv_heads: int) -> tuple[Tensor, ...]:
        cos, sin = cos.to(heads.dtype)[:, None], sin.to(heads.dtype)[:, None]  # (T, 1, hd)
        n_rotated = n_heads + n_kv_heads
        qk = heads[:, :, :n_rotated]
        rotated = _rotate_half(qk, cos, sin.roll(sin.shape[-1] // 2, -1), qk.new_empty(qk.shape), inverse=False)
        ctx.save_for_backward(cos, sin)
        ctx.n_heads, ctx.n_rotated = n_heads, n_rotated
        return rotated[:, :, :n_heads], rotated[:, :, n_heads:], heads[:, :, n_rotated:]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        nh, n_rotated = ctx.n_heads, ctx.n_rotated
        grad = grad_q.new_empty(*grad_q.shape[:2], n_rotated + grad_v.shape[2], grad_q.shape[3])
        _rotate_half(grad_q, cos, sin, grad[:, :, :nh], inverse=True)
        _rotate_half(grad_k, cos, sin, grad[:, :, nh:n_rotated], inverse=True)
        grad[:, :, n_rotated:].copy_(grad_v)
        return grad, None, None, None, None


def _rotate_half(x: Tensor, cos: Tensor, halves_sin: Tensor, out: Tensor, inverse: bool) -> Tensor:
    """x rotated into `out` in four kernels: out = x * cos, then out's first half minus and second half plus the
    other half of x * halves_sin; with halves_sin = sin with its halves swapped that is `apply_rope`'s x * cos +
    cat(-x2, x1) * sin, rounding for rounding. `inverse` adds to the first and subtracts from the second instead,
    with sin as is: the rotation back, RoPE's gradient."""
    torch.mul(x, cos, out=out)
    b1, b2 = (x * halves_sin).chunk(2, dim=-1)
    out1, out2 = out.chunk(2, dim=-1)
    out1.add_(b2) if inverse else out1.sub_(b2)
    out2.sub_(b1) if inverse else out2.add_(b1)
    return out


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_dim = cfg.ffn_dim
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.gate_up_proj(x)  # [gate | up]
        if h.requires_grad and not torch.compiler.is_compiling():  # eager training; inductor fuses the plain ops
            return self.down_proj(_SwiGLU.apply(h, self.ffn_dim))
        gate, up = h.split(self.ffn_dim, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up of h = [gate | up], with the values and gradients those ops have under autograd. Its backward
    writes the gradients of gate and up into one tensor shaped like h, where autograd's writes them apart and joins
    them with a cat, a pass over both halves more (docs/benchmarks.md, "The second GPU check")."""

    @staticmethod
    def forward(ctx, h: Tensor, ffn_dim: int) -> Tensor:
        gate, up = h.split(ffn_dim, dim=-1)
        silu = F.silu(gate)
        ctx.save_for_backward(h, silu)  # what autograd's silu and product keep
        ctx.ffn_dim = ffn_dim
        return silu * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        h, silu = ctx.saved_tensors
        gate, up = h.split(ctx.ffn_dim, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.split(ctx.ffn_dim, dim=-1)
        torch.mul(grad, silu, out=grad_up)
        torch.mul(grad, up, out=grad_gate)  # then through silu's derivative, in place
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_h, None


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        # No dropout module at p = 0 (the card): two calls less per layer and decoded token.
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, layer=0, mask=None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Axiom(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # Built on the meta device (names and shapes, for a checkpoint's weights: load_model), the model computes
        # nothing: torch's meta kernels are Python that imports torch._dynamo, seconds of every command's start.
        on_meta = torch.get_default_device().type == "meta"
        table = torch.empty(cfg.vocab_size, cfg.d_model) if on_meta else None  # None: nn.Embedding draws it
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=table)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        tie(self)
        if on_meta:
            cos, sin = (torch.empty(cfg.max_seq_len, cfg.head_dim) for _ in range(2))
        else:
            cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        # Document masking of packed sequences: with an id here (EOS), a position attends only within its document,
        # each ending with that id; set from outside (train.doc_masking), used without a KV cache only.
        self.doc_sep: int | None = None
        # Whether targets may hold IGNORE_INDEX (chat data), whose rows the loss then leaves out; set from outside:
        # False (text) spares the look at every target, a host sync per call on a GPU.
        self.ignored_targets = True
        self.loss_workspace = LossWorkspace()  # the CPU loss's block, reused from step to step
        self.compiled_loss = False  # the loss's chunks through torch.compile; set from outside (train.compile)
        self.loss_kernel = "chunked"  # the training loss's kernel; set from outside (train.loss_kernel)
        if not on_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/Llama-style init: N(0, 0.02) everywhere, residual output projections scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth; norms at 1."""
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        cache: KVCache | None = None,
        loss_chunk: int | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """tokens (B, T) -> mean cross-entropy over `targets` (B, T) if given, else logits (B, T, V), or
        (B, 1, V) with `last_only` (what decoding needs: the other positions' projections are skipped).

        With `cache`, the tokens continue the cached sequences: their keys and values are appended.
        """
        x = self.hidden_states(tokens, cache, last_only)
        if targets is None:
            return self.logits(x)
        x, targets = x.flatten(0, 1), targets.flatten()  # (B*T, d), (B*T,)
        workspace = None
        if not torch.compiler.is_compiling():  # a data-dependent shape and a reused buffer: eager only
            # Ignored targets (the prompts of chat data) need no logits: leaving their rows out skips most of the
            # output layer's work in fine-tuning (docs/finetuning.md); text data keeps every row.
            keep = targets != IGNORE_INDEX if self.ignored_targets else None
            if keep is not None and not bool(keep.all()):
                x, targets = x[keep], targets[keep]
            workspace = self.loss_workspace
        if self.loss_kernel != "chunked" and torch.is_grad_enabled():  # evaluation needs no gradients: ours
            return fused_cross_entropy(self.loss_kernel, x, self.lm_head.weight, targets)
        return chunked_cross_entropy(
            x, self.lm_head.weight, targets, loss_chunk, workspace=workspace, compiled=self.compiled_loss
        )

    def logits(self, x: Tensor) -> Tensor:
        """Final hidden states (..., d) -> logits (..., V): `output_logits` over the table, or the output module's
        own forward once `axiom.infer.fast.prepare_model` has replaced it (packed or quantized weights)."""
        if type(self.lm_head) is nn.Linear:
            return output_logits(x, self.lm_head.weight)
        return self.lm_head(x)

    def hidden_states(self, tokens: Tensor, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """`forward` up to the output layer: the final normalised hidden states (B, T, d), or (B, 1, d)
        with `last_only`."""
        B, T = tokens.shape
        cos, sin, mask = self._positions(T, cache, tokens.device)
        if cache is None and self.doc_sep is not None:
            mask = document_mask(tokens, self.doc_sep)
        x = self.embed(tokens)  # (B, T, d)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # once, not in each layer (a bfloat16 model decoding)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, None, i, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.norm(x)

    def _positions(self, T: int, cache: KVCache | None, device) -> tuple[Tensor, Tensor, Tensor | BlockMask | None]:
        """RoPE cos/sin for the T new tokens and the attention mask (None where SDPA's causal flag or
        no mask at all is exact: a fresh sequence, or one new token attending to every filled slot; a BlockMask for
        a compiled step of one token over a static cache)."""
        if cache is None or (not cache.static and min(cache.lengths) == max(cache.lengths)):
            start = cache.lengths[0] if cache is not None else 0
            if start + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {start + T} exceeds max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hd)
            if start == 0 or T == 1:
                return cos, sin, None
            slots = torch.arange(start + T, device=device)
            return cos, sin, slots[None, :] <= slots[start:, None]  # (T, S)
        # Rows filled to different levels. A static cache's levels stay on the device (never Python ints), so
        # its shapes are the same at every step; a dynamic one's span the longest row.
        if cache.static:
            filled = cache.positions
            slots = torch.arange(cache.keys[0].shape[2], device=device)  # (S,) every slot
        else:
            if max(cache.lengths) + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {max(cache.lengths) + T} exceeds max_seq_len={self.cfg.max_seq_len}")
            filled = torch.tensor(cache.lengths, device=device)
            slots = torch.arange(max(cache.lengths) + T, device=device)
        pos = filled[:, None] + torch.arange(T, device=device)  # (B, T): each row's positions = the slots it writes
        cache.write_at(pos)
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hd)
        if cache.static and T == 1 and torch.compiler.is_compiling() and flex_decoding(self.cfg, device):
            return cos, sin, filled_slots_mask(filled, len(slots))
        mask = slots[None, None, :] <= pos[:, :, None]  # (B, T, S) causal within each row
        return cos, sin, mask[:, None]  # (B, 1, T, S)


# Slots per block of `filled_slots_mask`: flex_attention's default block size.
DECODE_BLOCK = 128
# Where a compiled decoding step attends through `filled_slots_mask`: on a GPU flex_attention is a Triton kernel.
# Inductor's CPU template for it failed to build for some shapes (torch 2.13: "Unsupported for `epilogue_nodes`"),
# and a CPU decodes eagerly by default anyway; there the step keeps SDPA under a dense mask. A device type whose flex
# step fails to compile leaves the set (`stop_flex_decoding`).
FLEX_DEVICES = frozenset({"cuda"})


def flex_decoding(cfg: ModelConfig, device: torch.device | str) -> bool:
    """Whether a compiled one-token step over a static cache attends through `filled_slots_mask`: on FLEX_DEVICES,
    for the head shapes flex_attention's kernels take (a head_dim of at least 16, for Triton's dot products; a
    power-of-two number of query heads per key head, for its decoding kernel)."""
    group = cfg.n_heads // cfg.n_kv_heads
    return torch.device(device).type in FLEX_DEVICES and cfg.head_dim >= 16 and group & (group - 1) == 0


def stop_flex_decoding(device_type: str, error: Exception) -> None:
    """Take `device_type` off FLEX_DEVICES for the rest of the process, with a warning, after a compiled step that
    attends through flex_attention failed to compile there (`error`): its later steps keep SDPA under a dense mask,
    the path a step took before flex_attention, so decoding goes on instead of failing."""
    global FLEX_DEVICES
    FLEX_DEVICES = FLEX_DEVICES - {device_type}
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    log.warning(
        "flex_attention's decoding step did not compile on %s (%s); decoding attends through SDPA", device_type, first
    )


def filled_slots_mask(filled: Tensor, max_len: int) -> BlockMask:
    """The mask of one new token per row over a static cache of `max_len` slots: row b attends to slots 0..filled[b]
    (its filled slots and the one it writes now), as a flex_attention block mask that lists, per row, only the blocks
    of DECODE_BLOCK slots up to its own fill level. Its attention then reads those blocks alone, where SDPA under a
    dense mask reads all max_len slots of every row (docs/benchmarks.md, "Decoding on a GPU")."""
    blocks = -(-max_len // DECODE_BLOCK)
    visited = (filled // DECODE_BLOCK + 1).clamp(max=blocks).to(torch.int32)[:, None, None]  # (B, 1, 1)
    order = torch.arange(blocks, dtype=torch.int32, device=filled.device).expand(len(filled), 1, 1, blocks)

    def up_to_own_slot(b: Tensor, h: Tensor, q: Tensor, slot: Tensor) -> Tensor:
        return slot <= filled[b]

    return BlockMask.from_kv_blocks(
        visited,
        order,
        BLOCK_SIZE=DECODE_BLOCK,
        mask_mod=up_to_own_slot,
        seq_lengths=(1, max_len),
        compute_q_blocks=False,  # what a backward pass reads: a decoding step has none
    )


# ---- the tied table: with tie_embeddings the output layer's weight is the token table itself, stored once

HEAD, EMBED = "lm_head.weight", "embed.weight"  # Llama's names: lm_head.weight and model.embed_tokens.weight


def tie(model: Axiom) -> Axiom:
    """Make the output layer's weight the embedding's own Parameter if the config ties them: when the model is
    built, and after loading with assign=True (which puts new Parameters in place)."""
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def is_stored(name: str, tied: bool) -> bool:
    """Whether weights on disk hold tensor `name`: every one but the output table of a tied model."""
    return not (tied and name == HEAD)


def untie(state: dict[str, Tensor], tied: bool, embed: str = EMBED, where: str = "") -> dict[str, Tensor]:
    """The tensors as stored: with tied embeddings the output table is left out (it is `embed`, e.g.
    "model.embed_tokens.weight" in Llama's names). A separate lm_head.weight that differs from the embedding
    is refused (`where` names the source). Every writer of weights goes through `untie`, every reader `retie`."""
    if not tied or HEAD not in state:
        return state
    head, other = state[HEAD], state.get(embed)
    if other is not None and head.data_ptr() != other.data_ptr() and not torch.equal(head, other):
        raise AxiomError(f"{where}: {HEAD} differs from {embed} but the config ties them")
    return {name: t for name, t in state.items() if is_stored(name, tied)}


def retie(state: dict[str, Tensor], tied: bool, embed: str = EMBED) -> dict[str, Tensor]:
    """The tensors as a model holds them, for a strict `load_state_dict`: with tied embeddings the output table
    is the embedding `embed` again. (A rank that only receives FSDP's broadcast may pass no tensors at all.)"""
    if not tied or HEAD in state or embed not in state:
        return state
    return {**state, HEAD: state[embed]}


def document_mask(tokens: Tensor, sep: int) -> Tensor:
    """(B, T) ids -> (B, 1, T, T) causal attention mask within documents, each ending with `sep`. With RoPE this
    computes exactly what each document alone would (scores depend on relative positions only)."""
    ends = (tokens == sep).long()
    doc = ends.cumsum(dim=1) - ends  # (B, T) document number of each position; a document's `sep` belongs to it
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one block: attention, SwiGLU and the two norms."""
    attn = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.d_model
    return attn + 3 * cfg.d_model * cfg.ffn_dim + 2 * cfg.d_model


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Parameter count without building the model."""
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embed
    n = cfg.n_layers * block_params(cfg) + cfg.d_model + head
    return n if non_embedding else n + embed


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4; the output projection
    counts, the embedding lookup does not) plus attention scores and values, 12 * layers * d * T
    (the PaLM appendix-B convention, without halving for the causal mask)."""
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    matmul_weights = num_params(cfg, non_embedding=True) - norms + cfg.vocab_size * cfg.d_model * cfg.tie_embeddings
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
