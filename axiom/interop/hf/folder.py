"""Hugging Face model folders on disk: config.json in either format, safetensors weights.

Reading a folder checks everything before converting: the architecture, the config fields Axiom can
represent, and every tensor's name and shape, so that bad input fails with one message naming the problem.
"""

from __future__ import annotations

import math
from pathlib import Path

from safetensors.torch import load_file
from torch import Tensor

from axiom.config import Config, ModelConfig, TrainConfig
from axiom.errors import AxiomError
from axiom.files import describe_missing, member, read_json
from axiom.interop.hf.names import AXIOM_CONFIG, LLAMA_CONFIG, LLAMA_NAMES, from_llama, to_llama
from axiom.model.checkpoint import check_finite, check_tensors, expected_tensors
from axiom.model.transformer import EMBED, untie
from axiom.text.tokenizer import EOS_ID

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"axiom": "AxiomForCausalLM", "llama": "LlamaForCausalLM"}
AUTO_MAP = {
    "AutoConfig": "configuration_axiom.AxiomConfig",
    "AutoModelForCausalLM": "modeling_axiom.AxiomForCausalLM",
}


def hf_config(cfg: Config, fmt: str, dtype: str, meta: dict) -> dict:
    """config.json of an export; `axiom` keeps the checkpoint's own config.json so import restores it."""
    m = cfg.model
    names = AXIOM_CONFIG if fmt == "axiom" else LLAMA_CONFIG
    head = {"architectures": [ARCHITECTURES[fmt]], "model_type": fmt}
    if fmt == "axiom":
        head["auto_map"] = AUTO_MAP
    fields = {names[k]: getattr(m, k) for k in names}
    if fmt == "llama":
        fields |= {
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
        }
    eos = EOS_ID if m.vocab_size > EOS_ID else None  # a cut-down test vocabulary has no EOS
    tail = {"bos_token_id": None, "eos_token_id": eos, "use_cache": True, "dtype": dtype, "torch_dtype": dtype}
    return {**head, **fields, **tail, "axiom": meta}


def read_config(directory: Path) -> dict:
    path = directory / CONFIG
    if not directory.is_dir():
        raise AxiomError(f"{directory} is not a directory; pass a Hugging Face model folder")
    if not path.is_file():
        what = "not found" if not path.exists() else describe_missing(path)
        raise AxiomError(f"{path} {what}; a Hugging Face model folder needs config.json and model.safetensors")
    return read_json(path, "a Hugging Face model folder needs a valid config.json")


def detect_format(hf: dict, path: Path) -> str:
    archs = hf.get("architectures") or []
    for fmt, arch in ARCHITECTURES.items():
        if arch in archs or (not archs and hf.get("model_type") == fmt):
            return fmt
    raise AxiomError(
        f"{path}: unknown architecture {archs or None} (model_type {hf.get('model_type')!r}); "
        f"axiom import reads {' or '.join(ARCHITECTURES.values())}"
    )


def _ffn_fields(ffn_dim: int, d_model: int) -> tuple[float, int]:
    """ffn_multiplier and ffn_multiple_of that make ModelConfig derive exactly `ffn_dim`."""
    multiple = math.gcd(ffn_dim, 256)
    exact = ffn_dim / d_model
    if multiple * math.ceil(exact * d_model / multiple) == ffn_dim:
        return exact, multiple
    return (ffn_dim - 0.5) / d_model, multiple  # rounds up to ffn_dim whatever the float error


def model_config_from_hf(hf: dict, fmt: str, path: Path) -> ModelConfig:
    """The ModelConfig a config.json describes; fields Axiom cannot represent are rejected by name."""
    names = AXIOM_CONFIG if fmt == "axiom" else LLAMA_CONFIG
    for field in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim"):
        if not isinstance(hf.get(names[field]), int):
            raise AxiomError(f"{path}: field {names[field]!r} is missing or not an integer")
    value = {field: hf.get(key) for field, key in names.items()}
    if fmt == "llama":
        key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        rope = hf.get(key) or {}
        if not isinstance(rope, dict):
            raise AxiomError(f"{path}: field {key!r} must be an object (rope_type, rope_theta, ...)")
        found = {  # field: (its value, whether Axiom-Dense can represent it)
            "hidden_act": (act := hf.get("hidden_act", "silu"), act in ("silu", "swish")),
            "attention_bias": (hf.get("attention_bias"), not hf.get("attention_bias")),
            "mlp_bias": (hf.get("mlp_bias"), not hf.get("mlp_bias")),
            f"{key}.rope_type": (kind := rope.get("rope_type", rope.get("type", "default")), kind == "default"),
        }
        for name, (value_found, supported) in found.items():
            if not supported:
                raise AxiomError(f"{path}: {name} {value_found!r} is not supported by Axiom-Dense")
        value["rope_theta"] = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        tied = hf.get("tie_word_embeddings", False)  # Llama's default
        if not isinstance(tied, bool):  # bool("false") is True
            raise AxiomError(f"{path}: tie_word_embeddings is {tied!r}, expected true or false")
        value["tie_embeddings"] = tied
    d_model, n_heads = value["d_model"], value["n_heads"]
    head_dim = value.pop("head_dim") or d_model // n_heads
    if not isinstance(head_dim, int) or isinstance(head_dim, bool):
        raise AxiomError(f"{path}: head_dim is {head_dim!r}, expected an integer")
    if head_dim * n_heads != d_model:
        raise AxiomError(
            f"{path}: head_dim={head_dim} with {n_heads} heads != hidden size {d_model}; "
            "Axiom derives head_dim = d_model // n_heads"
        )
    ffn_multiplier, ffn_multiple_of = _ffn_fields(value.pop("ffn_dim"), d_model)
    # transformers' own defaults for absent fields (LlamaConfig's, or AxiomConfig's = the card's)
    defaults = {"n_kv_heads": n_heads, "norm_eps": 1e-6, "max_seq_len": 2048}
    if fmt == "axiom":
        defaults |= {"norm_eps": 1e-5, "rope_theta": 10_000.0, "max_seq_len": 1024}
    kwargs = {k: (defaults[k] if v is None and k in defaults else v) for k, v in value.items()}
    if kwargs["tie_embeddings"] is None:
        kwargs["tie_embeddings"] = True
    try:
        return ModelConfig(**kwargs, ffn_multiplier=ffn_multiplier, ffn_multiple_of=ffn_multiple_of)
    except (AxiomError, TypeError) as e:
        raise AxiomError(f"{path}: {e}") from None


def _config_with_provenance(hf: dict, m: ModelConfig, path: Path) -> tuple[Config, dict]:
    """Prefer the Axiom config an export carried (exact ffn_multiplier, training settings, progress)."""
    meta = hf.get("axiom")
    if not isinstance(meta, dict) or "model" not in meta:
        return Config(m, TrainConfig()), {}
    try:
        cfg = Config.from_dict({"model": meta["model"], "train": meta.get("train", {})})
    except (AxiomError, KeyError, TypeError) as e:
        raise AxiomError(f"{path}: field 'axiom' holds no valid Axiom config ({e})") from None
    for field in LLAMA_CONFIG:
        if getattr(cfg.model, field) != getattr(m, field):
            raise AxiomError(
                f"{path}: axiom.model gives {field}={getattr(cfg.model, field)} but the Hugging Face fields "
                f"give {getattr(m, field)}; fix or remove the 'axiom' entry"
            )
    return cfg, _record(meta, path)


# What an export's 'axiom' entry carries besides the config, as its checkpoint recorded it; the import keeps these
# (a key of any other name, such as one of save_weights' parameters, is not a checkpoint's record).
RECORD_TYPES = {"step": int, "tokens": int, "val_loss": (int, float), "data": dict, "chat_template": str}


def _record(meta: dict, path: Path) -> dict:
    record = {k: v for k, v in meta.items() if k in RECORD_TYPES}
    for key, value in record.items():
        if not isinstance(value, RECORD_TYPES[key]) or isinstance(value, bool):
            raise AxiomError(f"{path}: axiom.{key} is {value!r}, not what a checkpoint records; fix or remove it")
    return record


def load_weights(directory: Path) -> dict[str, Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json (file names
    inside `directory` only)."""
    if (directory / WEIGHTS).is_file():
        files = [directory / WEIGHTS]
    elif (directory / INDEX).is_file():
        index = read_json(directory / INDEX, "a sharded model needs a valid index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise AxiomError(f"{directory / INDEX}: no valid weight_map (expected an object of tensor -> file)")
        files = sorted({member(directory, name, f"{directory / INDEX}: weight_map") for name in weight_map.values()})
    else:
        raise AxiomError(
            f"{directory}: no {WEIGHTS} (or {INDEX}); axiom import reads safetensors only, "
            "so re-save the model with save_pretrained(DIR, safe_serialization=True)"
        )
    state = {}
    for file in files:
        if not file.is_file():
            raise AxiomError(f"{file} not found (listed in {INDEX})")
        try:
            part = load_file(file)
        except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
            raise AxiomError(f"{file} is not a readable safetensors file ({e})") from None
        twice = sorted(state.keys() & part.keys())
        if twice:  # which copy counts would depend on the order of the files
            raise AxiomError(f"{file}: {twice[0]} is in another shard too; a tensor belongs to one file")
        state.update(part)
    return state


def folder_config(directory: str | Path) -> tuple[str, Config, dict]:
    """A Hugging Face folder's config.json alone -> (format, Config, progress metadata)."""
    directory = Path(directory)
    hf = read_config(directory)
    path = directory / CONFIG
    fmt = detect_format(hf, path)
    cfg, progress = _config_with_provenance(hf, model_config_from_hf(hf, fmt, path), path)
    return fmt, cfg, progress


def read_folder(directory: str | Path) -> tuple[str, Config, dict[str, Tensor], dict]:
    """A Hugging Face folder in either format -> (format, Config, Axiom float32 state dict, progress metadata)."""
    directory = Path(directory)
    fmt, cfg, progress = folder_config(directory)
    m = cfg.model
    expected = expected_tensors(m)
    if fmt == "llama":
        expected = to_llama(expected, m)
    raw = {k: v for k, v in load_weights(directory).items() if not k.endswith("rotary_emb.inv_freq")}
    embed = LLAMA_NAMES[EMBED][0] if fmt == "llama" else EMBED
    raw = untie(raw, m.tie_embeddings, embed, where=str(directory))  # some writers store the tied table twice
    check_tensors(raw, expected, f"{directory} ({ARCHITECTURES[fmt]})")
    check_finite(raw, str(directory))
    state = from_llama(raw, m)[0] if fmt == "llama" else raw
    return fmt, cfg, {k: v.float() for k, v in state.items()}, progress
