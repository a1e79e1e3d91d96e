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

IGNORE_INDEX = -100  # a target the loss leaves out (masked chat tokens, padding)


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
    """Keys and values of every layer for a batch of sequences (rows), each filled left to right from slot 0.

    Every row has its own fill level, so rows holding texts of different lengths decode together (the engine's
    slots, axiom/engine.py): a row's new keys go after its own filled slots, its positions count from its own
    start, and it attends to its own filled slots only. Slots beyond a row's fill level may hold stale keys from
    an earlier text; they are always masked.

    A dynamic cache (the default) keeps the fill levels as Python ints in `lengths`, so shapes are decided without
    reading the device: when every row is filled alike (one sequence, or a batch in step) it attends over the
    filled slots with no mask at all, the fast path. A static cache (`static=True`) keeps every shape fixed:
    attention spans all max_len slots under a mask and the fill levels are the device tensor `positions`,
    advanced in place, so one compiled graph (or CUDA graph) serves every decoding step.
    """

    keys: list[Tensor]  # per layer (B, n_kv_heads, max_len, head_dim)
    values: list[Tensor]
    lengths: list[int]  # dynamic cache: slots filled per row
    positions: Tensor | None = None  # static cache: (B,) int64 slots filled per row, advanced in place
    slots: Tensor | None = None  # (B, T) slots the current forward writes, when rows differ (set by _positions)

    @property
    def static(self) -> bool:
        return self.positions is not None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, device, dtype, static: bool = False) -> KVCache:
        """A cache of `batch` empty rows of `max_len` slots. Zeros, not garbage: a masked slot still meets a
        zero attention weight, and 0 * NaN would be NaN."""
        shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        new = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]  # noqa: E731
        positions = torch.zeros(batch, dtype=torch.long, device=device) if static else None
        return cls(new(), new(), [0] * batch, positions)

    def rows(self, start: int, n: int) -> KVCache:
        """A cache over rows start..start+n-1 that shares this one's storage (its keys, values and positions
        are views). A dynamic view's `lengths` is a copy: the owner updates its own after the forward."""
        view = lambda ts: [t.narrow(0, start, n) for t in ts]  # noqa: E731
        positions = self.positions.narrow(0, start, n) if self.static else None
        return KVCache(view(self.keys), view(self.values), self.lengths[start : start + n], positions)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, n_kv, T, hd) after each row's filled slots; return the keys and values to attend over
        (the filled ones, or every slot of a static cache)."""
        T = k.shape[2]
        if self.slots is None:  # rows filled alike: one contiguous block, narrow + copy_ (fewest ops)
            start = self.lengths[0]
            self.keys[layer].narrow(2, start, T).copy_(k)
            self.values[layer].narrow(2, start, T).copy_(v)
            return self.keys[layer].narrow(2, 0, start + T), self.values[layer].narrow(2, 0, start + T)
        index = self.slots[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, n_kv, T, hd)
        self.keys[layer].scatter_(2, index, k)
        self.values[layer].scatter_(2, index, v)
        if self.static:
            return self.keys[layer], self.values[layer]
        end = max(self.lengths) + T
        return self.keys[layer].narrow(2, 0, end), self.values[layer].narrow(2, 0, end)

    def advance(self, T: int) -> None:
        """Count the T tokens just written into every row."""
        if self.static:
            self.positions.add_(T)
        else:
            self.lengths = [n + T for n in self.lengths]
        self.slots = None


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
        nh, nkv = self.n_heads, self.n_kv_heads
        qkv = self.qkv_proj(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh+2nkv, T, hd)
        # One RoPE call rotates query and key heads together: half the kernels of rotating them apart.
        qk = apply_rope(qkv[:, : nh + nkv], cos, sin)
        q, k, v = qk[:, :nh], qk[:, nh:], qkv[:, nh + nkv :]  # (B, nh, T, hd), (B, nkv, T, hd) x 2
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Causal within a fresh sequence; a cached step brings its own mask (or none for one new token).
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
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
        # No dropout module at p = 0 (the card): two calls less per layer and decoded token.
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

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
        # Document masking of packed sequences: with an id here (EOS), a position attends only within its document,
        # each ending with that id; set from outside (train.doc_masking), used without a KV cache only.
        self.doc_sep: int | None = None
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
        if not torch.compiler.is_compiling():  # a data-dependent shape: eager only
            # Ignored targets (the prompts of chat data) need no logits: leaving their rows out skips most of the
            # output layer's work in fine-tuning (3.5x faster steps on the chat demo); text data keeps every row.
            keep = targets != IGNORE_INDEX
            if not bool(keep.all()):
                x, targets = x[keep], targets[keep]
        return chunked_cross_entropy(x, self.lm_head.weight, targets, loss_chunk)

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

    def _positions(self, T: int, cache: KVCache | None, device) -> tuple[Tensor, Tensor, Tensor | None]:
        """RoPE cos/sin for the T new tokens and the attention mask (None where SDPA's causal flag or
        no mask at all is exact: a fresh sequence, or one new token attending to every filled slot)."""
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
        cache.slots = pos
        cos, sin = self.rope_cos[pos][:, None], self.rope_sin[pos][:, None]  # (B, 1, T, hd)
        mask = slots[None, None, :] <= pos[:, :, None]  # (B, T, S) causal within each row
        return cos, sin, mask[:, None]  # (B, 1, T, S)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (tied weights once); `non_embedding` leaves out the token table."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def document_mask(tokens: Tensor, sep: int) -> Tensor:
    """(B, T) ids -> (B, 1, T, T) causal attention mask within documents, each ending with `sep`. With RoPE this
    computes exactly what each document alone would (scores depend on relative positions only)."""
    ends = (tokens == sep).long()
    doc = ends.cumsum(dim=1) - ends  # (B, T) document number of each position; a document's `sep` belongs to it
    T = tokens.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
    return (causal & (doc[:, :, None] == doc[:, None, :]))[:, None]


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Parameter count without building the model."""
    attn = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim + cfg.n_heads * cfg.head_dim * cfg.d_model
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
    matmul_weights = num_params(cfg, non_embedding=True) - norms + cfg.vocab_size * cfg.d_model * cfg.tie_embeddings
    return 6 * matmul_weights + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def output_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., d) @ weight.T -> logits (..., V).

    On CPU a handful of rows (decoding) takes MKL's matrix-vector path, which runs on one core far below
    memory bandwidth (4.2 ms for the 100,277 x 128 table on the 2-core benchmark VM); the same dot products
    as a batched matmul over row blocks of the table use every core (0.8 ms). See docs/benchmarks.md."""
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
    16 otherwise. Any count from 2 to 256 runs alike on the 2-core VM: more blocks only spread the rows."""
    return next((b for b in range(16, 257) if V % b == 0), 16)


# The chunked loss's (n, V) fp32 block on CPU, kept between steps: glibc hands blocks this large back to the OS on
# free, so a fresh 200-400 MB block per step costs a page fault per 4 KB plus kernel zeroing (~0.1 s of a 1.3 s
# step of `small` on the 2-core VM). Taken out while in use, so concurrent callers simply allocate their own.
_spare_blocks: list[Tensor] = []


def release_loss_workspace() -> None:
    """Free the chunked loss's kept CPU block (it comes back at the next CPU training step)."""
    _spare_blocks.clear()


def _take_block(numel: int) -> Tensor:
    block = _spare_blocks.pop() if _spare_blocks else None
    return block if block is not None and block.numel() >= numel else torch.empty(numel, dtype=torch.float32)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `hidden @ weight.T` without holding (N, V) fp32 logits.

    The forward pass walks the rows in chunks, and for each chunk computes the loss and at once its
    gradients with respect to the hidden states and the weight (softmax - one_hot). Backward then only
    scales the stored gradients, so no logits are kept and none are recomputed.

    Each chunk touches one (n, V) fp32 block only: log-softmax and exp run in place on it, and the
    per-row factor valid / n_valid is applied to the small (n, d) operands instead of the block.
    Under autocast the table is cast to the low-precision dtype once, not once per chunk and matmul.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int, ignore_index: int) -> Tensor:
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = (
            torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if weight.requires_grad else None
        )
        device_type = hidden.device.type
        low = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        w = weight.to(low) if low is not None else weight
        V = weight.shape[0]
        fp32_cpu = device_type == "cpu" and low is None and hidden.dtype == weight.dtype == torch.float32
        block = _take_block(min(chunk, hidden.shape[0]) * V) if fp32_cpu and not torch.compiler.is_compiling() else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            h = h.to(low) if low is not None else h
            rows = torch.arange(len(t), device=t.device)
            valid = t != ignore_index
            safe_t = t.clamp(min=0)
            if block is not None:
                logp = torch.mm(h, w.t(), out=block[: len(t) * V].view(len(t), V))  # (n, V)
            else:
                logp = (h @ w.t()).float()  # (n, V)
            torch.log_softmax(logp, dim=-1, out=logp)
            loss -= (logp[rows, safe_t] * valid).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(mean loss)/d logits = (softmax - one_hot) * valid / n_valid
            g = logp.exp_()
            g[rows, safe_t] -= 1.0
            g = g.to(h.dtype)
            del logp  # under autocast g is a low-precision copy: free the fp32 block before the matmuls
            scale = (valid / n_valid).to(h.dtype)[:, None]  # (n, 1)
            if grad_hidden is not None:
                grad_hidden[s : s + chunk] = (g @ w) * scale
            if grad_weight is None:
                continue
            if low is None:
                grad_weight.addmm_(g.t(), h * scale)  # accumulates without a (V, d) temporary
            else:
                grad_weight += g.t() @ (h * scale)  # low-precision product, fp32 sum, no fp32 (V, d) temporary
        if block is not None:
            _spare_blocks[:] = [block]
        # Kept on ctx, not saved for backward: they are this function's own buffers, scaled in place once.
        ctx.grads = (grad_hidden, grad_weight)
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
        return gh, gw, None, None, None


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 1024, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean cross-entropy of logits `hidden @ weight.T` (hidden (N, d), weight (V, d), targets (N,))."""
    return _ChunkedCrossEntropy.apply(hidden, weight, targets, chunk, ignore_index)
