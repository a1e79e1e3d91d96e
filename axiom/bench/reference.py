"""The reference model of `axiom bench --vs-hf`: transformers' Llama with our shapes and our weights, and the
bench's seeded random weights."""

from __future__ import annotations

import torch

from axiom.config import ModelConfig
from axiom.errors import AxiomError
from axiom.interop.hf.names import LLAMA_CONFIG, LLAMA_NAMES, to_llama
from axiom.model.transformer import EMBED, Axiom, retie


def seeded_model(m: ModelConfig, seed: int) -> Axiom:
    """The bench's random weights: the same for the same seed, so that the references' copy is made again once ours
    is measured, not held beside ours."""
    torch.manual_seed(seed)
    return Axiom(m)


def llama_like(m: ModelConfig, device: torch.device, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' Llama with our shapes (tied embeddings, no biases, SDPA attention) and our weights."""
    from transformers import LlamaConfig, LlamaForCausalLM  # the optional hf extra
    from transformers.utils import logging

    logging.set_verbosity_error()  # no notes about generation flags on every call
    config = LlamaConfig(
        **{theirs: getattr(m, ours) for ours, theirs in LLAMA_CONFIG.items()},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=m.dropout,
        bos_token_id=None,
        eos_token_id=None,  # EOS disabled: every run generates exactly the tokens asked for
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    with torch.device(device):
        hf = LlamaForCausalLM(config)
    llama = retie(to_llama(weights, m), m.tie_embeddings, LLAMA_NAMES[EMBED][0])
    missing, unexpected = hf.load_state_dict(llama, strict=False)
    if missing or unexpected:
        raise AxiomError(f"reference Llama does not fit: missing {missing}, unexpected {unexpected}")
    return hf
