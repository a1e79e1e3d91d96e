"""Axiom-Dense for Hugging Face transformers (remote code, written next to the weights by `axiom export`).

Self-contained: imports only torch and transformers. Module and parameter names are Axiom's own
(`embed`, `layers.{i}.attn.qkv_proj`, ...), so the weights are the training checkpoint's tensors as they are;
`lm_head.weight` is tied to `embed.weight` and stored once. The arithmetic follows axiom/model/transformer.py: RMSNorm
normalises in fp32 and casts back before scaling, RoPE angles are computed in fp32 in the rotate-half layout.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_axiom import AxiomConfig

# transformers 5.24 renamed the cache field of model outputs from past_key_values to cache.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class AxiomRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin (B, 1, T, head_dim) in fp32, rotate-half layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)


class AxiomAttention(nn.Module):
    def __init__(self, config: AxiomConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        qkv_out = (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
        self.qkv_proj = nn.Linear(config.d_model, qkv_out, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv_proj(x).split([self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd], dim=-1)
        q = q.view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = v.view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention, without needing torch's enable_gqa
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class AxiomMLP(nn.Module):
    def __init__(self, config: AxiomConfig):
        super().__init__()
        self.ffn_dim = config.ffn_dim
        self.gate_up_proj = nn.Linear(config.d_model, 2 * config.ffn_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_dim, config.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.ffn_dim, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class AxiomBlock(nn.Module):
    def __init__(self, config: AxiomConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = AxiomRMSNorm(config.d_model, config.norm_eps)
        self.attn = AxiomAttention(config, layer_idx)
        self.mlp_norm = AxiomRMSNorm(config.d_model, config.norm_eps)
        self.mlp = AxiomMLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask_4d(attention_mask, past: int, T: int, device: torch.device) -> torch.Tensor | None:
    """A boolean (B, 1, T, past+T) mask, or None when plain causal attention (or none at all) is right.

    Padded keys are hidden; a padded query still sees itself so that its softmax is defined (its output is
    never used), which keeps NaNs out of the cache.
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (past == 0 or T == 1):
        return None
    q_pos = torch.arange(past, past + T, device=device)
    k_pos = torch.arange(past + T, device=device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None]  # (1, T, S)
    if padded:
        keep = attention_mask[:, : past + T].bool()[:, None, :]  # (B, 1, S)
        mask = (mask & keep) | (k_pos[None, None, :] == q_pos[None, :, None])
    return mask[:, None]


class AxiomForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = AxiomConfig
    base_model_prefix = "axiom"  # no submodule has this name: the checkpoint's keys are used as they are
    _no_split_modules = ["AxiomBlock"]
    _tied_weights_keys = {"lm_head.weight": "embed.weight"}  # transformers >= 5 (a list before)

    def __init__(self, config: AxiomConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(AxiomBlock(config, i) for i in range(config.n_layers))
        self.norm = AxiomRMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        past_key_values=None,  # the cache's name before transformers 5.24
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = (cache if cache is not None else past_key_values) if use_cache else None
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("AxiomForCausalLM takes a 2D (batch, sequence) attention_mask")
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + T]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        cos, sin = rope(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = attention_mask_4d(attention_mask, past, T, x.device)
        hidden = []  # the input of every block, then the final normed output (transformers' convention)
        for layer in self.layers:
            hidden.append(x)
            x = layer(x, cos, sin, mask, cache)
        x = self.norm(x)
        hidden.append(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten().to(logits.device), ignore_index=-100
            )
        want_hidden = kwargs.get("output_hidden_states") or self.config.output_hidden_states
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=tuple(hidden) if want_hidden else None, **{CACHE_FIELD: cache}
        )
