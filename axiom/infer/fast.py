"""Readying a loaded model for decoding: `prepare_model(model, dtype)` casts or quantizes its weights and swaps
its linear layers for ones whose few-row products (decoding) stream the weights on every core.

Batch-1 decoding is memory-bound: each token reads every weight once (1.54 GB in float32 for axiom-380m), so a
token costs bytes read / bandwidth. torch's own paths for a (1, K) x (N, K)^T product run far below the
machine's bandwidth on CPU, so on CPU the few-row products go through kernels (axiom.infer.kernels) that split the
rows of the weight over the cores, and the streamed weights sit on 2 MB pages (docs/benchmarks.md, "Decoding at
the bandwidth limit"); the rest of a one-token step takes a few kernel calls per layer (`DecodeBlock`). Prefill
(many rows) is compute-bound: float32 prompts of up to 96 rows take the kernels' register tiles, longer ones
oneDNN's matrix-matrix kernel; bfloat16 and int8 take torch's.

    float32   weights as trained
    bfloat16  weights and activations in bfloat16 (half the bytes per token)
    int8      weight-only int8: every linear weight and the (tied) token table as int8 with one float scale
              per output channel (row), activations in bfloat16; a quarter of float32's bytes (the decode
              kernel rounds each activation row to int16 for the VNNI dot product: under 1e-4 relative)

Inference only: the prepared model has no gradients and is not for training (the quantized modules hold
buffers, not parameters). Training never calls this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from axiom.dtypes import INFERENCE_DTYPES
from axiom.errors import AxiomError
from axiom.infer import kernels
from axiom.model.cache import KVCache
from axiom.model.checkpoint import load_model
from axiom.model.loss import output_logits, padded_table, padded_vocab
from axiom.model.transformer import Axiom, Block
from axiom.runtime import pick_device

# A product with at most this many rows (decoding: one per sequence of the batch) takes the few-row kernels;
# more rows (prefill) take the matrix-matrix kernels, which are efficient on their own.
FEW_ROWS = 16
# float32 prompts up to this many rows take the kernels' register tiles, which beat oneDNN's linear there; beyond,
# the prompt's rows outgrow L2 and oneDNN's blocking wins (docs/benchmarks.md, "Float32 prompts in register tiles")
TILE_ROWS = 96


def prepare_model(model: Axiom, dtype: str = "float32") -> Axiom:
    """Ready `model` for decoding in `dtype` (one of INFERENCE_DTYPES), in place; returns it.

    Sets eval mode and turns gradients off, casts the weights (float32, bfloat16) or quantizes them (int8), and
    replaces every nn.Linear and the token table with modules whose forward picks a fast kernel by row count.
    RoPE tables stay float32. The KV cache of a decoding loop follows the remaining parameters' dtype (the
    norms): float32 for float32, bfloat16 for bfloat16 and int8."""
    if dtype not in INFERENCE_DTYPES:
        raise AxiomError(f"--dtype {dtype!r}: choose one of {', '.join(INFERENCE_DTYPES)}")
    model.eval().requires_grad_(False)
    act = torch.float32 if dtype == "float32" else torch.bfloat16
    tied = model.cfg.tie_embeddings  # then lm_head.weight is embed.weight (axiom.model.transformer.tie)
    if dtype == "int8":  # quantized from the weights as loaded, before any cast
        table = quantize_rows(model.embed.weight.data)
        model.embed = Int8Embedding(*table, act)
        model.lm_head = Int8Linear(*(table if tied else quantize_rows(model.lm_head.weight.data)), act)
    for block in model.layers:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    if dtype == "int8":
                        setattr(parent, name, Int8Linear(*quantize_rows(child.weight.data), act))
                    else:
                        setattr(parent, name, FastLinear(child.weight, kernels=dtype == "bfloat16"))
    for p in model.parameters():  # what is left in floating point; a tied table once (lm_head.weight is embed.weight)
        p.data = p.data.to(act)
    if dtype != "int8":
        # the same Parameter: the table stays tied, stored once
        model.lm_head = FastLinear(model.lm_head.weight, kernels=dtype == "bfloat16")
    device = next(model.parameters()).device
    if device.type == "cpu":
        if kernels.available() and model.cfg.head_dim % 16 == 0:  # the fused attention's vectors: 16 at a time
            model.layers = nn.ModuleList(DecodeBlock(block) for block in model.layers)
        pack_weights(model)
    elif device.type == "cuda" and dtype != "int8":
        pad_output_table(model)
    return model


def pad_output_table(model: Axiom) -> None:
    """The output layer over its table padded with zero rows to a multiple of 128 (`VOCAB_MULTIPLE`), the logits cut
    back to the vocabulary. On a GPU a product over 100,277 columns (bf16 rows of 200,554 bytes, not 16-byte aligned)
    takes an sm75 fallback kernel, a share of a batch-16 decoding step on an H200 (docs/benchmarks.md), as in
    training's loss. A tied table stays stored once: the token table becomes the padded one's first rows."""
    weight = model.lm_head.weight.data
    vocab = weight.shape[0]
    padded = padded_table(weight, None, padded_vocab(vocab))
    if model.cfg.tie_embeddings:
        model.embed.weight.data = padded[:vocab]
    model.lm_head = PaddedOutput(padded, vocab)


class PaddedOutput(nn.Module):
    """Logits over the first `vocab` rows of a zero-padded table (V_padded, d): the product over all of them."""

    def __init__(self, table: Tensor, vocab: int):
        super().__init__()
        self.register_buffer("padded", table)
        self.vocab = vocab

    @property
    def weight(self) -> Tensor:
        """The vocabulary's rows, which a loss or a scorer takes: a padded row's logit would be 0, not excluded."""
        return self.padded[: self.vocab]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.padded)[..., : self.vocab]


HUGE_PAGE = 2 << 20


def pack_weights(model: Axiom) -> None:
    """Move the streamed weights (every linear's, the table once) into one buffer backed by 2 MB pages on Linux.

    With 4 KB pages the hardware prefetchers restart at every page and the TLB misses every 4 KB; on 2 MB pages the
    products stream faster (docs/benchmarks.md, "The kernels, per thread"). Linux gives an anonymous mapping huge
    pages where `madvise(MADV_HUGEPAGE)` asks before its first touch (and the system's transparent_hugepage setting
    is `madvise` or `always`); elsewhere this is only a copy."""
    owners: dict[int, list[tuple[nn.Module, str]]] = {}  # tensor id -> (module, attribute) holding it
    tensors: dict[int, Tensor] = {}
    for m in model.modules():
        name = "weight" if isinstance(m, FastLinear) else "q" if isinstance(m, Int8Linear | Int8Embedding) else None
        if name is not None:
            t = getattr(m, name)
            tensors[id(t)] = t
            owners.setdefault(id(t), []).append((m, name))
    sizes = [-(-t.numel() * t.element_size() // 64) * 64 for t in tensors.values()]  # 64-byte aligned slots
    arena = huge_page_buffer(sum(sizes))
    offset = 0
    for (key, t), size in zip(tensors.items(), sizes, strict=True):
        view = arena[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)  # the original is freed once no module holds it
        for m, name in owners[key]:
            if name in m._parameters:
                m._parameters[name].data = view
            else:
                m._buffers[name] = view
        offset += size


def huge_page_buffer(nbytes: int) -> Tensor:
    """An untouched uint8 buffer of `nbytes`, 2 MB-aligned, advised to use huge pages where Linux allows it."""
    raw = torch.empty(nbytes + 2 * HUGE_PAGE, dtype=torch.uint8)  # room to align the start and round up the end
    start = -raw.data_ptr() % HUGE_PAGE
    buf = raw[start : start + nbytes]
    if sys.platform == "linux":
        length = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(length), MADV_HUGEPAGE)
    return buf


MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def weight_bytes_per_token(model: Axiom) -> int:
    """Bytes of weights a decoded token reads: every linear weight (and int8 scales) and the output table once;
    the token table's one looked-up row, the norms and the KV cache are left out (under 1% at short context)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear | FastLinear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, PaddedOutput):  # all of the padded table is read
            total += m.padded.numel() * m.padded.element_size()
        elif isinstance(m, Int8Linear):
            total += m.q.numel() + m.scale_f32.numel() * 4
    return total


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-row (output channel) int8: weight (N, K) ~= q (N, K) int8 * scale (N,) float32."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def few_rows(x: Tensor) -> bool:
    """Whether a product with input x (..., K) is a decoding step on CPU (the row-split kernels' case)."""
    return x.device.type == "cpu" and x.numel() // x.shape[-1] <= FEW_ROWS


def kernels_fit(weight: Tensor) -> bool:
    """Whether axiom.infer.kernels are built here and take this weight (N, K): K a multiple of 16, as every preset's.
    Decided once per module, when it is made: torch.compile then sees a plain attribute, not a build."""
    return weight.device.type == "cpu" and weight.shape[-1] % 16 == 0 and kernels.available()


@functools.cache
def onednn_linear_works() -> bool:
    """Whether torch's oneDNN linear (`mkldnn._linear_pointwise`, the op inductor's CPU fusions use) runs here on a
    plain float32 weight and agrees with F.linear; checked once, so a torch without it falls back to F.linear."""
    try:
        x, w = torch.randn(3, 32), torch.randn(8, 32)
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [None], "")
        return torch.allclose(out, F.linear(x, w), rtol=1e-4, atol=1e-4)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class FastLinear(nn.Module):
    """nn.Linear without bias over a float weight (N, K). Few rows on CPU: with `kernels`, `axiom_decode.linear`
    (each core streams a band of rows), else `output_logits`'s row blocks (a batched matmul over blocks of rows;
    float32 only: torch's bf16 batched matmul is slower than its plain one).

    prepare_model asks for the kernels in bfloat16 only. In float32 the row blocks were as fast or faster, and
    inside a compiled step inductor fuses them where the kernel is an opaque call; in bfloat16 the kernel wins
    (docs/benchmarks.md, "At two threads on a quiet machine"). Float32 prompts (FEW_ROWS to TILE_ROWS rows) take
    the kernel's register tiles either way; longer ones oneDNN's linear."""

    def __init__(self, weight: nn.Parameter, kernels: bool = True):
        super().__init__()
        self.weight = weight
        self.tiles = kernels_fit(weight)  # float32 prompts of up to TILE_ROWS rows, whatever `kernels` says
        self.kernels = kernels and self.tiles
        # longer float32 prompts on CPU: oneDNN's matrix-matrix kernel, faster than MKL's (F.linear; docs/benchmarks.md)
        # (dtypes are checked per call: prepare_model casts the weights after making the modules)
        self.onednn = weight.device.type == "cpu" and onednn_linear_works()

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        prompt = self.tiles and FEW_ROWS < rows <= TILE_ROWS and self.weight.dtype == torch.float32
        if prompt or (self.kernels and few_rows(x)):
            out = torch.ops.axiom_decode.linear(x.reshape(rows, x.shape[-1]), self.weight)
            return out.view(*x.shape[:-1], -1)
        if few_rows(x) and self.weight.dtype == torch.float32:
            return output_logits(x, self.weight)
        if self.onednn and self.weight.dtype == torch.float32:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, None, "none", [None], "")
        return F.linear(x, self.weight)


class Int8Linear(nn.Module):
    """Weight-only int8 linear: y = (x @ q.T) * scale, q (N, K) int8, scale (N,); x in `act_dtype`."""

    def __init__(self, q: Tensor, scale: Tensor, act_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(act_dtype))
        self.register_buffer("scale_f32", scale.float())  # what the kernel multiplies by
        self.act_dtype = act_dtype
        self.kernels = kernels_fit(q)

    @property
    def weight(self) -> Tensor:
        """The dequantized weight (N, K) in the activation dtype: what the loss path (`Axiom.forward` with
        targets) multiplies by; built per call, so evaluation works but pays for it."""
        return self.q.to(self.act_dtype) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.act_dtype)
        if self.kernels and few_rows(x):
            out = torch.ops.axiom_decode.linear_int8(rows, self.q, self.scale_f32)  # (rows, N)
        elif few_rows(x) and self.act_dtype == torch.bfloat16 and self.q.shape[1] % 16 == 0:
            # torch's weight-only int8 kernel; of other widths it reads past its rows (NaN, or a segfault)
            out = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scale)
        else:
            # prefill: the int8 values as they are (exact in bfloat16), a matrix-matrix product, then the row scales
            # on its (rows, N) output: half the passes over the N x K weight of scaling it first
            out = F.linear(rows, self.q.to(self.act_dtype)) * self.scale
        return out.view(*x.shape[:-1], -1)


class DecodeBlock(nn.Module):
    """A transformer block whose one-token steps over a dynamic KV cache (eager decoding on CPU) take 7 calls of
    axiom.infer.kernels (RMSNorm, the fused RoPE + cache write + attention, the gate) and the 4 linear products,
    instead of ~60 torch ops, whose dispatch and SDPA's slow one-query CPU kernels took a good part of a token
    (docs/benchmarks.md, "Fewer calls per layer"). Everything else (prefill, training-style forwards, a static
    cache) goes through the block itself."""

    def __init__(self, block: Block):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None, layer=0, mask=None) -> Tensor:
        B, T, d = x.shape
        if cache is None or cache.static or T != 1:
            return self.block(x, cos, sin, cache, layer, mask)
        ops, attn, mlp = torch.ops.axiom_decode, self.block.attn, self.block.mlp
        h = ops.rms_norm(x.view(B, d), self.block.attn_norm.weight, self.block.attn_norm.eps)
        hd = attn.head_dim
        y = ops.decode_attention(
            attn.qkv_proj(h),
            cache.keys[layer],
            cache.values[layer],
            cache.lengths,  # the slot each row writes: its own fill level
            cos.reshape(-1, hd),
            sin.reshape(-1, hd),
            hd**-0.5,
        )  # (B, nh * hd)
        x = x + attn.o_proj(y).view(B, T, d)
        h = ops.rms_norm(x.view(B, d), self.block.mlp_norm.weight, self.block.mlp_norm.eps)
        return x + mlp.down_proj(ops.silu_mul(mlp.gate_up_proj(h))).view(B, T, d)


class Int8Embedding(nn.Module):
    """Token table as int8 rows with per-row scales (shared with a tied Int8Linear): looks up and dequantizes."""

    def __init__(self, q: Tensor, scale: Tensor, act_dtype: torch.dtype):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.to(act_dtype))
        self.act_dtype = act_dtype

    def forward(self, tokens: Tensor) -> Tensor:
        return self.q[tokens].to(self.act_dtype) * self.scale[tokens, None]


def load_for_inference(ckpt: str, device: str | None, dtype: str) -> tuple[Axiom, dict]:
    """A checkpoint's model on `device` (--device: None picks one), readied for decoding in `dtype`
    (`prepare_model`), and its config.json."""
    model, _, meta = load_model(ckpt, pick_device(device))
    return prepare_model(model, dtype), meta
