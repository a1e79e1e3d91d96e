"""Axiom-Dense: a Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings).

Plain modules only: no training, data or distributed code. Activation checkpointing is a flag of the
model so the block loop stays one loop; compile and DDP/FSDP wrapping are applied from outside.

Weight layout follows Hugging Face Llama (rotate-half RoPE), so export is a rename plus splitting the
fused projections: `qkv_proj` = [q_proj; k_proj; v_proj] and `gate_up_proj` = [gate_proj; up_proj]
stacked along the output dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from axiom.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
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


@dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences, filled left to right.

    `pad` (B,) counts left-padding slots per row (prompts of different lengths are left-padded):
    those keys are masked and positions start after them.
    """

    keys: list[Tensor]  # per layer (B, n_kv_heads, max_len, head_dim)
    values: list[Tensor]
    pad: Tensor | None = None
    length: int = 0  # slots filled so far

    @classmethod
    def empty(
        cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype, pad: Tensor | None = None
    ) -> KVCache:
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        new = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]  # noqa: E731
        return cls(new(), new(), pad)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv, T, hd) after the filled slots; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


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
        mask: Tensor | None = None,
    ) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv_proj(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Causal within a fresh sequence; a cached step brings its own mask (or none for one new token).
        is_causal = cache is None or (mask is None and cache.length == 0 and T > 1)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn_dim = cfg.ffn_dim
        self.gate_up_proj = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.ffn_dim, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, layer=0, mask=None) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Axiom(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
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
        loss_chunk: int = 1024,
    ) -> Tensor:
        """tokens (B, T) -> mean cross-entropy over `targets` (B, T) if given, else logits (B, T, V).

        With `cache`, the tokens continue the cached sequences: their keys and values are appended.
        """
        B, T = tokens.shape
        start = cache.length if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {start + T} exceeds max_seq_len={self.cfg.max_seq_len}")
        mask = None
        if cache is not None and cache.pad is not None:
            positions = (torch.arange(start, start + T, device=tokens.device) - cache.pad[:, None]).clamp(
                min=0
            )
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]  # (B, 1, T, hd)
            slots = torch.arange(start + T, device=tokens.device)
            causal = slots[None, :] <= (start + torch.arange(T, device=tokens.device))[:, None]  # (T, S)
            mask = causal[None] & (slots[None, None, :] >= cache.pad[:, None, None])  # (B, T, S)
            mask = mask[:, None]  # (B, 1, T, S)
        else:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, hd)
            if cache is not None and start > 0 and T > 1:
                slots = torch.arange(start + T, device=tokens.device)
                mask = slots[None, :] <= (start + torch.arange(T, device=tokens.device))[:, None]

        x = self.embed(tokens)  # (B, T, d)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, i, mask)
        if cache is not None:
            cache.length += T
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        return chunked_cross_entropy(x.flatten(0, 1), self.lm_head.weight, targets.flatten(), loss_chunk)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); `non_embedding` leaves out the token table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Parameter count without building the model."""
    attn = (
        cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        + cfg.n_heads * cfg.head_dim * cfg.d_model
    )
    per_layer = attn + 3 * cfg.d_model * cfg.ffn_dim + 2 * cfg.d_model
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else embed
    n = cfg.n_layers * per_layer + cfg.d_model + head
    return n if non_embedding else n + embed


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4; the output projection
    counts, the embedding lookup does not) plus attention scores and values, 12 * layers * d * T
    (the PaLM appendix-B convention, without halving for the causal mask)."""
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    matmul_weights = (
        num_params(cfg, non_embedding=True) - norms + cfg.vocab_size * cfg.d_model * cfg.tie_embeddings
    )
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` without holding (N, V) fp32 logits.

    The forward pass walks the rows in chunks, and for each chunk computes the loss and at once its
    gradients with respect to the hidden states and the weight (softmax - one_hot). Backward then only
    scales the stored gradients, so no logits are kept and none are recomputed.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int
    ) -> Tensor:
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = (
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
            if weight.requires_grad
            else None
        )
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            logits = (h @ weight.t()).float()  # (n, V)
            valid = t != ignore_index
            safe_t = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            loss += ((lse - picked) * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean loss)/d logits = (softmax - one_hot) / n_valid on valid rows, 0 elsewhere
            g = torch.exp(logits - lse[:, None])
            g[torch.arange(len(t), device=t.device), safe_t] -= 1.0
            g *= (valid.float() / n_valid)[:, None]
            g = g.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = g @ weight
            if grad_weight is not None:
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024, ignore_index: int = -100
) -> Tensor:
    """Mean cross-entropy of logits `hidden @ weight.T` (hidden (N, d), weight (V, d), targets (N,))."""
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index)
