"""torch.profiler over one optimizer step of a preset as `axiom train` runs it: the plan resolved for this device
(micro-batch, accumulation, checkpointing, compile), synthetic token ids, warmed up (compiled) first. Writes the
kernels with the most device time (OUT/kernels.txt) and prints one JSON line: the step's wall, host and device time
(host time above device time: the GPU waits for launches), kernel launches, the top kernels and the plan.
scripts/gpu_check.sh runs it as its `kernels` part; on a CPU it profiles the CPU ops (the smoke test does).

    python scripts/profile_step.py OUT [--preset axiom-380m] [--set NAME=VALUE ...] [--warmup 3] [--rows 25]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from axiom.bench.timing import sync
from axiom.bench.train import Warmed
from axiom.config import get_config
from axiom.errors import run_script
from axiom.model.transformer import Axiom
from axiom.runtime import pick_device
from axiom.train.parallel import Dist, parallelize
from axiom.train.plan import plan_here

# CUDA runtime calls in which the host waits for the device (a device-to-host copy into pageable memory waits too)
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMemcpy")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profiled_step(preset: str, overrides: list[str], device: torch.device, warmup: int) -> tuple[profile, float, dict]:
    """One optimizer step under torch.profiler after `warmup` steps: the profile, its wall seconds, the plan."""
    cfg, plan, _ = plan_here(get_config(preset, overrides), device)  # the optimizer that will run here
    cfg = plan.applied(cfg)
    m, t = cfg.model, cfg.train
    torch.manual_seed(0)
    tokens = torch.randint(0, m.vocab_size, (t.grad_accum_steps, t.micro_batch_size, t.seq_len + 1))
    batches = [(row[:, :-1].contiguous().to(device), row[:, 1:].contiguous().to(device)) for row in tokens]
    model = Axiom(m).to(device)
    model.ignored_targets = False  # synthetic ids, like text: as the trainer runs it
    warmed = Warmed(parallelize(model, t, device, Dist()), t, device, batches, max(warmup, 1))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()  # inside: the profiler's own start and stop are not the step's
        warmed.step()
        sync(device)
        wall_s = time.perf_counter() - start
    return prof, wall_s, plan.to_dict()


def summary(prof: profile, wall_s: float, plan: dict, rows: int) -> dict:
    """Wall, host and device seconds of the step, kernel launches, and the `rows` kernels (CPU ops without a GPU)
    with the most time of their own."""
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    device_s = sum(e.self_device_time_total for e in kernels) / 1e6 if kernels else None
    waited_s = sum(e.self_cpu_time_total for e in events if e.key in WAITS) / 1e6
    ranked = kernels or [e for e in events if e.device_type == DeviceType.CPU]
    time_of = (lambda e: e.self_device_time_total) if kernels else (lambda e: e.self_cpu_time_total)
    ranked = sorted(ranked, key=time_of, reverse=True)[:rows]
    return {
        "wall_s": wall_s,
        "host_s": wall_s - waited_s,  # the host's own work: wall time less its waits for the device
        "device_s": device_s,
        "launches": sum(e.count for e in events if e.key in LAUNCHES),
        "top": [{"name": e.key[:120], "ms": time_of(e) / 1e3, "calls": e.count} for e in ranked],
        "plan": plan,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for kernels.txt")
    parser.add_argument("--preset", default="axiom-380m")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=3, help="steps before the profiled one (compiling: default 3)")
    parser.add_argument("--rows", type=int, default=25, help="kernels in the table (default: 25)")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    prof, wall_s, plan = profiled_step(args.preset, args.overrides, device, args.warmup)
    result = summary(prof, wall_s, plan, args.rows)
    sort_by = "self_device_time_total" if result["device_s"] is not None else "self_cpu_time_total"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=args.rows) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_script(main)
