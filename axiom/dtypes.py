"""Every dtype a config or command names, in one table: torch's name, llama.cpp's short name and the torch dtype,
and which of them each use accepts.

    float32   f32    weights as trained
    bfloat16  bf16
    float16   f16
    int8      q8_0   8-bit weights with float scales: one per row in Axiom's decoding (axiom.infer.fast), one per
                     block of 32 in llama.cpp's q8_0; each is the other's nearest

Every --dtype takes either spelling of a row (`SPELLINGS`) and lists its choices the same way (`describe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DType:
    name: str  # torch's spelling: configs, the decoding commands' --dtype, transformers' config.json
    short: str  # llama.cpp's spelling: GGUF file types; every --dtype takes either
    torch: torch.dtype | None  # None for 8-bit weights with float scales

    @property
    def quantized(self) -> bool:
        return self.torch is None


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("float32", "f32", torch.float32),
        DType("bfloat16", "bf16", torch.bfloat16),
        DType("float16", "f16", torch.float16),
        DType("int8", "q8_0", None),
    )
}

# The names each use accepts, in the order its messages list them.
TRAIN_DTYPES = ("bfloat16", "float16", "float32")  # TrainConfig.dtype: autocast on a GPU
INFERENCE_DTYPES = ("float32", "bfloat16", "int8")  # axiom.infer.fast.prepare_model, --dtype of generate/chat/serve
BENCH_DTYPES = (*INFERENCE_DTYPES, "float16")  # axiom bench generate --dtype
FOLDER_DTYPES = ("float32", "bfloat16")  # axiom export --format axiom or llama
GGUF_DTYPES = ("float32", "bfloat16", "float16", "int8")  # axiom export --format gguf


# --dtype: both spellings of each row, torch's first
SPELLINGS: dict[str, DType] = {spelling: d for d in DTYPES.values() for spelling in (d.name, d.short)}


def spellings(names: tuple[str, ...]) -> list[str]:
    """Both spellings of each of `names` (torch's), for a --dtype's choices: ["float32", "f32", ...]."""
    return [spelling for name in names for spelling in (name, DTYPES[name].short)]


def describe(names: tuple[str, ...], conjunction: str = "or") -> str:
    """`names` as every --dtype help and message lists them: "float32 (f32), bfloat16 (bf16) or int8 (q8_0)"."""
    both = [f"{name} ({DTYPES[name].short})" for name in names]
    return f"{', '.join(both[:-1])} {conjunction} {both[-1]}" if len(both) > 1 else both[0]


def dtype_name(spelling: str) -> str:
    """torch's name for either spelling ("bf16" -> "bfloat16"); anything else as it is, for the caller to refuse."""
    found = SPELLINGS.get(spelling)
    return found.name if found is not None else spelling


def short_name(name: str) -> str:
    """llama.cpp's name for torch's: "bfloat16" -> "bf16", "int8" -> "q8_0"."""
    return DTYPES[name].short


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a floating-point name ("bfloat16" -> torch.bfloat16)."""
    found = DTYPES[name]
    if found.quantized:
        raise ValueError(f"{name} is not a torch floating-point dtype")
    return found.torch
