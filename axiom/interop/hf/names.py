"""The explicit maps between Axiom and Hugging Face: parameter names and config fields.

Axiom's weights already use Llama's layout (rotate-half RoPE, so no q/k permutation), so converting is a
rename plus splitting the two fused projections along the output dimension (dim 0):

    qkv_proj     = [q_proj; k_proj; v_proj]   rows n_heads*hd, n_kv_heads*hd, n_kv_heads*hd
    gate_up_proj = [gate_proj; up_proj]       rows ffn_dim, ffn_dim

The `axiom` export format (remote code) keeps Axiom's names unchanged; only `llama` needs this table.
"""

from __future__ import annotations

import torch
from torch import Tensor

from axiom.config import ModelConfig
from axiom.model.transformer import is_stored

# Axiom name -> Llama name(s); a fused Axiom weight is its Llama parts concatenated along dim 0, in order.
LLAMA_NAMES: dict[str, tuple[str, ...]] = {
    "embed.weight": ("model.embed_tokens.weight",),
    "layers.{i}.attn_norm.weight": ("model.layers.{i}.input_layernorm.weight",),
    "layers.{i}.attn.qkv_proj.weight": (
        "model.layers.{i}.self_attn.q_proj.weight",
        "model.layers.{i}.self_attn.k_proj.weight",
        "model.layers.{i}.self_attn.v_proj.weight",
    ),
    "layers.{i}.attn.o_proj.weight": ("model.layers.{i}.self_attn.o_proj.weight",),
    "layers.{i}.mlp_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight",),
    "layers.{i}.mlp.gate_up_proj.weight": (
        "model.layers.{i}.mlp.gate_proj.weight",
        "model.layers.{i}.mlp.up_proj.weight",
    ),
    "layers.{i}.mlp.down_proj.weight": ("model.layers.{i}.mlp.down_proj.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),  # stored only when the embeddings are not tied
}

# ModelConfig field -> LlamaConfig field. The remote-code AxiomConfig uses ModelConfig's own names, except
# that it calls tie_embeddings by transformers' name, tie_word_embeddings.
LLAMA_CONFIG: dict[str, str] = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "ffn_dim": "intermediate_size",
    "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
}
AXIOM_CONFIG: dict[str, str] = {k: ("tie_word_embeddings" if k == "tie_embeddings" else k) for k in LLAMA_CONFIG}


def llama_names(m: ModelConfig) -> dict[str, tuple[str, ...]]:
    """The name map with layer indices filled in, for the tensors a checkpoint of `m` stores."""
    names = {}
    for ours, theirs in LLAMA_NAMES.items():
        if not is_stored(ours, m.tie_embeddings):
            continue
        for i in range(m.n_layers) if "{i}" in ours else [None]:
            names[ours.format(i=i)] = tuple(t.format(i=i) for t in theirs)
    return names


def _part_rows(name: str, m: ModelConfig) -> list[int]:
    if name.endswith("qkv_proj.weight"):
        return [m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim, m.n_kv_heads * m.head_dim]
    if name.endswith("gate_up_proj.weight"):
        return [m.ffn_dim, m.ffn_dim]
    raise KeyError(name)


def to_llama(state: dict[str, Tensor], m: ModelConfig) -> dict[str, Tensor]:
    """Axiom state dict (tied table stored once) -> Llama state dict; every tensor owns its memory."""
    out = {}
    for ours, theirs in llama_names(m).items():
        parts = state[ours].split(_part_rows(ours, m)) if len(theirs) > 1 else [state[ours]]
        out.update({name: part.contiguous().clone() for name, part in zip(theirs, parts, strict=True)})
    return out


def from_llama(state: dict[str, Tensor], m: ModelConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Llama state dict -> (Axiom state dict, Llama names that were expected but missing)."""
    out, missing = {}, []
    for ours, theirs in llama_names(m).items():
        absent = [t for t in theirs if t not in state]
        missing += absent
        if not absent:
            out[ours] = torch.cat([state[t] for t in theirs]) if len(theirs) > 1 else state[theirs[0]]
    return out, missing
