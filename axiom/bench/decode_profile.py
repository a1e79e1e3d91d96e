"""Where one decoding step's time goes (`axiom bench generate --profile`): an engine's steps timed plainly, then the
same number of steps under torch.profiler, summed per step: the ops' host time, the time spent waiting for the
device, and on a GPU the kernels (how many, how long) and the launches that started them (single kernels or whole
CUDA graphs). A step's wall time well above its kernel time means the device waits for the host (launches, Python,
synchronisation), not for memory.
"""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, schedule

from axiom.bench.timing import sync
from axiom.errors import AxiomError
from axiom.infer.engine import Engine, SamplingParams

PROFILED_STEPS = 8
TOP = 8  # kernels and host ops listed by name
KERNEL_LAUNCHES = frozenset({"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"})
GRAPH_LAUNCHES = frozenset({"cudaGraphLaunch", "cuGraphLaunch"})
# host calls that wait for the device: reading the new tokens back, and copies from pageable memory
WAITS = frozenset({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"})


def profile_decode(engine: Engine, prompts: list[list[int]]) -> tuple[str, dict]:
    """torch.profiler's table of PROFILED_STEPS greedy decoding steps of `prompts` (fewer where the context leaves
    no room; all running at once: the engine's max_batch holds them), and the per-step figures (`step_figures`). The
    engine is warm: compiled steps replay."""
    room = min(engine.max_len - len(p) for p in prompts) - 3
    if room < 2:  # the requests would end before the timed steps, which would time nothing
        raise AxiomError(
            f"--profile times decoding steps after the prompt: a prompt of {max(map(len, prompts))} tokens leaves "
            f"{room + 3} of the context's {engine.max_len}; give a --prompt-len at most {engine.max_len - 5}"
        )
    steps = min(PROFILED_STEPS, room // 2)
    requests = [engine.submit(p, SamplingParams(max_new_tokens=2 * steps + 3, temperature=0.0)) for p in prompts]
    device = engine.device
    try:
        engine.step()  # the prefills, each row's first token
        engine.step()  # a first decoding step, untimed
        wall = timed_steps(engine, steps)
        with profile(activities=activities(device), schedule=schedule(wait=0, warmup=1, active=1, repeat=1)) as prof:
            engine.step()  # the profiler's own first-use costs fall on this step, which it leaves out
            prof.step()
            profiled = timed_steps(engine, steps)
            prof.step()
    finally:
        for r in requests:
            engine.cancel(r)
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=20)
    return table, step_figures(events, steps, (wall, profiled), device.type == "cuda")


def timed_steps(engine: Engine, steps: int) -> float:
    """Seconds per step of `steps` engine steps."""
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(engine.device)
    return (time.perf_counter() - start) / steps


def activities(device: torch.device) -> list[ProfilerActivity]:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def step_figures(events: EventList, steps: int, walls: tuple[float, float], cuda: bool) -> dict:
    """Per decoding step, from profiled `steps` steps: `step_ms` (timed without the profiler), `profiled_step_ms`
    (with it: the profiler's own overhead included), `host_ms` (the ops' own CPU time, waits left out), `wait_ms`
    (host calls waiting for the device), `python_ms` (the host's time between ops), and on CUDA `kernels`,
    `kernel_ms` (their summed device time), `kernel_launches` and `graph_launches`; the heaviest kernels and host
    ops as [name, calls per step, ms per step]."""
    step = [e for e in events if e.key.startswith("ProfilerStep")]  # its own time: Python between the ops
    host = [e for e in events if e.device_type == DeviceType.CPU and e not in step]
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and e not in step]  # the step's range is no kernel

    def per_step(total_us: float) -> float:
        return total_us / steps / 1e3

    def heaviest(rows: list, time_of) -> list[list]:
        rows = sorted(rows, key=time_of, reverse=True)[:TOP]
        return [[e.key, e.count / steps, per_step(time_of(e))] for e in rows]

    figures = {
        "steps": steps,
        "step_ms": walls[0] * 1e3,
        "profiled_step_ms": walls[1] * 1e3,
        "host_ms": per_step(sum(e.self_cpu_time_total for e in host if e.key not in WAITS)),
        "wait_ms": per_step(sum(e.self_cpu_time_total for e in host if e.key in WAITS)),
        "python_ms": per_step(sum(e.self_cpu_time_total for e in step)),
        "top_host_ops": heaviest(host, lambda e: e.self_cpu_time_total),
    }
    if cuda:
        figures |= {
            "kernels": sum(e.count for e in kernels) / steps,
            "kernel_ms": per_step(sum(e.self_device_time_total for e in kernels)),
            "kernel_launches": sum(e.count for e in host if e.key in KERNEL_LAUNCHES) / steps,
            "graph_launches": sum(e.count for e in host if e.key in GRAPH_LAUNCHES) / steps,
            "top_kernels": heaviest(kernels, lambda e: e.self_device_time_total),
        }
    return figures
