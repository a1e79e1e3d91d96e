"""Checkpoint directories: weights in safetensors, the resolved config and progress in config.json.

    CKPT/model.safetensors   weights; a tied table is stored once, as embed.weight
    CKPT/config.json         {"model": ModelConfig, "train": TrainConfig, "step", "tokens", "axiom_version"}
    CKPT/state.pt            training checkpoints only: optimizer, loader position, RNG states, counters

Loading never unpickles code: safetensors for weights, JSON for the rest, and state.pt (tensors and plain
Python values only) through torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from axiom import __version__
from axiom.config import Config
from axiom.errors import AxiomError
from axiom.files import read_json, replace_dir, restore_dir
from axiom.model import Axiom, rope_tables

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
STATE = "state.pt"
STEP_DIR = re.compile(r"step_(\d+)")


def save_model(model: Axiom, cfg: Config, directory: str | Path, **progress) -> None:
    """Write weights and config.json into `directory` (which must exist); `progress`: step, tokens, ...."""
    save_weights(model.state_dict(), cfg, directory, **progress)


def save_weights(state_dict: dict[str, torch.Tensor], cfg: Config, directory: str | Path, **progress) -> None:
    """`save_model` from a full state dict (e.g. one gathered from FSDP shards)."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if cfg.model.tie_embeddings:
        del state["lm_head.weight"]
    save_file(state, directory / WEIGHTS)
    meta = {**cfg.to_dict(), **progress, "axiom_version": __version__}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")


def stored_tensors(model: Axiom) -> dict[str, torch.Tensor]:
    """The state dict as saved: a tied output table is left out (it is embed.weight)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]
    return state


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str, config: str) -> None:
    """One AxiomError naming what differs between `found` and `expected`: missing, unexpected or misshapen tensors."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise AxiomError(
            f"{where}: weights do not match {config}: missing [{_first(missing)}], unexpected [{_first(unexpected)}]"
        )
    for name, tensor in found.items():
        if tensor.shape != expected[name].shape:
            raise AxiomError(
                f"{where}: {name} has shape {tuple(tensor.shape)} but {config} implies {tuple(expected[name].shape)}"
            )


def _first(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def read_meta(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise AxiomError(f"checkpoint: {path} not found; pass a checkpoint directory written by axiom train")
    return read_json(path, "pass a checkpoint directory written by axiom train")


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
    check_tensors(state, stored_tensors(model), f"checkpoint: {weights}", CONFIG)
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    # RoPE tables are not stored: rebuild them on the target device.
    cos, sin = rope_tables(cfg.model.head_dim, cfg.model.max_seq_len, cfg.model.rope_theta)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    return model, cfg, meta


# ---- training checkpoints: RUN/checkpoints/step_000200/{model.safetensors, config.json, state.pt}


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def save_training_state(state: dict, directory: str | Path) -> None:
    """`state` must hold only tensors and plain Python values, so that weights_only loading accepts it."""
    torch.save(state, Path(directory) / STATE)


def load_training_state(directory: str | Path) -> dict:
    path = Path(directory) / STATE
    if not path.is_file():
        raise AxiomError(f"checkpoint: {path} not found; resume needs a checkpoint written by axiom train")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise AxiomError(
            f"checkpoint: {path} cannot be read ({type(e).__name__}); resume from another checkpoint"
        ) from e


def rng_state() -> dict:
    """Python, NumPy and PyTorch (CPU and CUDA) generator states as tensors and plain values."""
    version, py_state, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_dir_atomic(final: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp_dir)`, then rename tmp_dir to `final`: a kill at any moment leaves either the old
    directory or the new one complete (an old `final` is moved aside first and removed last)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    restore_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    replace_dir(tmp, final)
    return final


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints under `root`, oldest first (temporary directories start with a dot)."""
    root = Path(root)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            m = STEP_DIR.fullmatch(d.name)
            if m and all((d / f).is_file() for f in (WEIGHTS, CONFIG, STATE)):
                found.append((int(m.group(1)), d))
    return sorted(found)


def prune_checkpoints(root: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` step checkpoints."""
    for _, d in list_checkpoints(root)[:-keep]:
        shutil.rmtree(d)
