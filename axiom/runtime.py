"""Where code runs: the device behind --device, mixed precision, a GPU's peak FLOP/s, torch.compile's cache."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from axiom.errors import AxiomError

# Dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s); the first name contained in the device name wins.
GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H100", 989),
    ("H200", 989),
    ("H800", 989),
    ("A100", 312),
    ("A800", 312),
    ("L40S", 362),
    ("L4", 121),
    ("RTX 4090", 165),
    ("RTX 3090", 71),
)


def pick_device(requested: str | None, local_rank: int | None = None) -> torch.device:
    """The device for `--device` (cpu, cuda, cuda:N or mps; default cuda when available), checked to exist:
    anything else is one AxiomError. Under torchrun (`local_rank`), plain `cuda` means this process's local GPU."""
    name = (requested or ("cuda" if torch.cuda.is_available() else "cpu")).strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise AxiomError(f"--device {requested}: unknown device; use cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise AxiomError(f"--device {requested}: no CUDA device is visible; use --device cpu")
        n = torch.cuda.device_count()
        i = int(index) if index else (local_rank if local_rank is not None else torch.cuda.current_device())
        if i >= n:
            raise AxiomError(f"--device {requested}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
        torch.cuda.set_device(i)
        return torch.device("cuda", i)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise AxiomError(f"--device {requested}: Apple's MPS backend is not available here; use --device cpu")
    return torch.device(kind)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; the CPU runs fp32 (CPU autocast is slow and not bit-reproducible)."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in GPU_BF16_PEAK_TFLOPS if key in name), None)


def persistent_compile_cache(folder: str | Path | None = None) -> Path:
    """Keep torch.compile's caches (inductor's FX graph cache, AOTAutograd's) in a folder that outlives the process
    and a reboot, so that a compiled decoding step is compiled once per machine: later runs load it (~10x faster
    than compiling, docs/benchmarks.md). Sets TORCHINDUCTOR_CACHE_DIR unless the user has (then that folder is
    kept); `folder` defaults to ~/.cache/axiom/inductor. Call before the first compile; returns the folder."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    path = Path(folder) if folder is not None else Path.home() / ".cache" / "axiom" / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # inductor reads it at each cache access
    return path
