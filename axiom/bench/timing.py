"""How `axiom bench` times: contenders run in interleaved rounds, peak memory, a profile, the summary figures.

Rounds alternate ours-first and theirs-first (ABBA) so that load from other processes falls on both; throughput is
the median over rounds, the ratio ours / theirs of the medians.
"""

from __future__ import annotations

import contextlib
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from axiom.runtime import gpu_peak_flops


@dataclass
class Contender:
    name: str
    run: Callable[[], None]  # one timed unit: an optimizer step, or one generate call
    tokens: int  # tokens per unit
    units: int  # units per round


@dataclass
class Bench:
    """What a bench measured: the figures `--json` prints, and torch.profiler's table of one of our runs (when
    asked)."""

    figures: dict
    profile: str | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(contenders: list[Contender], rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Tokens/s of each contender per round; the order flips every round (ABBA) to cancel drift."""
    rates = {c.name: [] for c in contenders}
    for r in range(rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            sync(device)
            start = time.perf_counter()
            for _ in range(c.units):
                c.run()
            sync(device)
            rates[c.name].append(c.tokens * c.units / (time.perf_counter() - start))
    return rates


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(device: torch.device, since_reset: bool = False) -> int | None:
    """CUDA max allocated bytes, or the process's peak RSS on CPU (getrusage; VmHWM after a reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if since_reset:
        return process_status_bytes("VmHWM")
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def memory_in_use(device: torch.device) -> int | None:
    """CUDA allocated bytes, or the process's resident memory (VmRSS, Linux)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return process_status_bytes("VmRSS")


def process_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


class OwnPeak:
    """`with OwnPeak(device) as memory:` the memory the work inside adds at its peak (`memory.bytes`): the peak since
    its start less what was in use at its start, so that another contender's model, still held, does not count."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self) -> OwnPeak:
        reset_peak(self.device)
        self._start = memory_in_use(self.device)
        return self

    def __exit__(self, *exc) -> None:
        peak = peak_memory(self.device, since_reset=True)
        self.bytes = peak - self._start if peak is not None and self._start is not None else None


def profile_table(fn: Callable[[], None]) -> str:
    """torch.profiler's table of one call of `fn`, the 20 ops with the most CPU time of their own."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def summary(rates: dict[str, list[float]], flops: float, device: torch.device) -> dict:
    """Median tokens/s, TFLOP/s and MFU of ours (null MFU without a known peak: CPU), and the ratio to "hf"."""
    ours = statistics.median(rates["axiom"])
    peak = gpu_peak_flops(device)
    out = {
        "tokens_per_s": ours,
        "achieved_tflops": ours * flops / 1e12,
        "mfu": ours * flops / peak if peak else None,
        "rounds_tokens_per_s": rates["axiom"],
    }
    if "hf" in rates:
        theirs = statistics.median(rates["hf"])
        out |= {"hf_tokens_per_s": theirs, "ratio_vs_hf": ours / theirs, "hf_rounds_tokens_per_s": rates["hf"]}
    return out


def versions(device: torch.device) -> dict:
    """The device and the versions of torch, Python and transformers (where installed) the figures came from."""
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info
