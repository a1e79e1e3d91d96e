"""Where code runs: the device behind --device, mixed precision, a GPU's peak FLOP/s, torch.compile's cache."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from axiom.errors import AxiomError

# Dense bf16 tensor-core peaks (vendor datasheets, TFLOP/s); the first name found in the device name as a whole word
# wins.
GPU_BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756),
    ("H100 NVL", 835),
    ("H100", 989),
    ("H200 NVL", 835),
    ("H200", 989),
    ("GH200", 989),
    ("H800 PCIe", 756),
    ("H800", 989),
    ("A100", 312),
    ("A800", 312),
    ("L40S", 362),
    ("L40", 181),
    ("L4", 121),
    ("RTX 4090", 165),
    ("RTX 3090", 71),
)


def default_device() -> str:
    """What --device means when not given."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_device(requested: str | None, local_rank: int | None = None, local_processes: int = 1) -> torch.device:
    """The device for `--device` (cpu, cuda, cuda:N or mps; default cuda when available), checked to exist:
    anything else is one AxiomError. Under torchrun (`local_rank` of `local_processes` on this machine), plain `cuda`
    means this process's local GPU, and a machine with fewer GPUs than processes is refused by every process alike
    (only the first process of a machine prints an error)."""
    name = (requested or default_device()).strip().lower()
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise AxiomError(f"--device {requested}: unknown device; use cpu, cuda, cuda:N or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise AxiomError(f"--device {requested}: no CUDA device is visible; use --device cpu")
        n = torch.cuda.device_count()
        i = int(index) if index else (local_rank if local_rank is not None else torch.cuda.current_device())
        if not index and local_rank is not None and local_processes > n:
            raise AxiomError(
                f"--device {name}: torchrun starts {local_processes} processes on this machine, which has {n} "
                f"CUDA device(s); start at most {n} (--nproc-per-node {n})"
            )
        if i >= n:
            raise AxiomError(f"--device {name}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1})")
        torch.cuda.set_device(i)
        return torch.device("cuda", i)
    if kind == "mps" and not torch.backends.mps.is_available():
        raise AxiomError(f"--device {requested}: Apple's MPS backend is not available here; use --device cpu")
    return torch.device(kind)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only; the CPU runs fp32 (CPU autocast is slow and not bit-reproducible).

    Without autocast's cache of bf16 weight copies: a forward casts each weight once either way, and a matmul keeps
    the copy it needs for backward itself, so the cache only held every layer's copy to the end of the forward where
    activation checkpointing had let them go (0.53 GiB of the card's settings, docs/benchmarks.md)."""
    if device.type == "cuda" and dtype != "float32":
        return torch.autocast("cuda", dtype=getattr(torch, dtype), cache_enabled=False)
    return contextlib.nullcontext()


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # whole words: "L4" is not the L40's entry
    return next((tf * 1e12 for key, tf in GPU_BF16_PEAK_TFLOPS if re.search(rf"\b{re.escape(key)}\b", name)), None)


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """The environment variable `name` set to `value` within the block and restored after: for a tool that reads a
    variable at use and takes no argument for it (ninja found through PATH, inductor's cache folder)."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def compile_cache_dir(folder: str | Path | None = None) -> Path:
    """A folder for torch.compile's caches that outlives the process and a reboot, so that a compiled decoding step
    is compiled once per machine and later runs load it (docs/benchmarks.md): the user's TORCHINDUCTOR_CACHE_DIR
    when set, else `folder` (default ~/.cache/axiom/inductor), created.

    Importing torch._dynamo writes inductor's default folder (in the temporary folder, emptied at reboot) into
    TORCHINDUCTOR_CACHE_DIR; the variable naming that folder is taken as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # imports inductor: only when compiling

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen is not None and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    path = Path(folder) if folder is not None else Path.home() / ".cache" / "axiom" / "inductor"
    path.mkdir(parents=True, exist_ok=True)
    return path


def persistent_compile_cache(folder: Path) -> contextlib.AbstractContextManager:
    """Within the block, torch.compile keeps its caches (inductor's FX graph cache, AOTAutograd's) in `folder`.
    Inductor has no setting for its cache folder: it reads TORCHINDUCTOR_CACHE_DIR at each cache access, so the
    variable is set for the block only. Compiling happens inside a call of a compiled function (its first, or a
    recompilation): wrap those calls."""
    return environment("TORCHINDUCTOR_CACHE_DIR", str(folder))
