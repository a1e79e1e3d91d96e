"""Checkpoint directories: weights in safetensors, the resolved config and progress in config.json.

    CKPT/model.safetensors   weights; a tied table is stored once, as embed.weight
    CKPT/config.json         {"model": ModelConfig, "train": TrainConfig, "step", "tokens", "axiom_version"}

Loading never unpickles code: safetensors for weights, JSON for the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from axiom import __version__
from axiom.config import Config
from axiom.errors import AxiomError
from axiom.model import Axiom, rope_tables

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: Axiom, cfg: Config, directory: str | Path, **progress) -> None:
    """Write weights and config.json into `directory` (which must exist); `progress`: step, tokens, ...."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.model.tie_embeddings:
        del state["lm_head.weight"]
    save_file(state, directory / WEIGHTS)
    meta = {**cfg.to_dict(), **progress, "axiom_version": __version__}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise AxiomError(f"checkpoint: {path} not found; pass a checkpoint directory written by axiom train")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AxiomError(f"checkpoint: {path} is not valid JSON ({e})") from None


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Axiom, Config, dict]:
    """Build the model a checkpoint describes and load its weights; returns (model, config, metadata)."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        cfg = Config.from_dict(meta)
    except (KeyError, TypeError) as e:
        raise AxiomError(f"checkpoint: {directory / CONFIG} has no valid model/train config ({e})") from None
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise AxiomError(f"checkpoint: {weights} not found")
    with torch.device("meta"):
        model = Axiom(cfg.model)
    state = load_file(weights, device=str(device))
    expected = set(model.state_dict()) - ({"lm_head.weight"} if cfg.model.tie_embeddings else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise AxiomError(
            f"checkpoint: {weights} does not fit the config: missing {missing}, unexpected {extra}"
        )
    for name, tensor in state.items():
        if tensor.shape != model.state_dict()[name].shape:
            raise AxiomError(
                f"checkpoint: {weights}: {name} has shape {tuple(tensor.shape)}, "
                f"config needs {tuple(model.state_dict()[name].shape)}"
            )
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    # RoPE tables are not stored: rebuild them on the target device.
    cos, sin = rope_tables(cfg.model.head_dim, cfg.model.max_seq_len, cfg.model.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model, cfg, meta
