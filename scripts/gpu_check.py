"""Every GPU figure the project still lacks, in one run: see scripts/gpu_check.sh (the entry point) and
docs/benchmarks.md ("A GPU check in one command").

Each part runs the project's own commands (`pytest`, `axiom bench`, `axiom prepare`, `axiom train`) in a subprocess
with a time limit, so one failure or out-of-memory cannot take the others down; a part that fails is reported as
such. Results go to OUT/gpu_check.json (everything) and OUT/gpu_check.md (one table), written as they come, so a
run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def axiom(*args: str) -> list[str]:
    return [sys.executable, "-m", "axiom.cli", *args]


class Check:
    """Runs the parts, keeps their results and rewrites the JSON and markdown after each one."""

    MIN_PART_SECONDS = 10  # less is not enough to start Python and torch: the part is not run

    def __init__(self, out: Path, smoke: bool, budget: float) -> None:
        self.out, self.smoke, self.budget = out, smoke, budget
        self.deadline = time.monotonic() + budget
        self.results: dict = {"smoke": smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "parts": {}}
        self.rows: list[tuple[str, str, str, str]] = []  # part, figure, target, verdict

    def run(self, name: str, cmd: list[str], timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess | None:
        """A command of a part; its output goes to OUT/NAME.log. None (and the part marked failed) on failure. It
        runs for at most its own `timeout` and what is left of the check's budget, not at all with too little left."""
        left = self.deadline - time.monotonic()
        if left < self.MIN_PART_SECONDS:
            self.record(name, {"ok": False, "error": f"not run: the check's {self.budget:g} s budget was spent"})
            return None
        timeout = min(timeout, left)
        start = time.perf_counter()
        log = self.out / f"{name}.log"
        try:
            done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            log.write_text(f"$ {' '.join(cmd)}\n{e.stdout or ''}\n{e.stderr or ''}\nTIMEOUT after {timeout:.0f} s\n")
            self.record(name, {"ok": False, "error": f"timed out after {timeout:.0f} s"})
            return None
        log.write_text(f"$ {' '.join(cmd)}\n{done.stdout}\n{done.stderr}")
        seconds = round(time.perf_counter() - start, 1)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            self.record(name, {"ok": False, "error": f"exit {done.returncode}: {tail[0][:300]}", "seconds": seconds})
            return None
        self.results["parts"].setdefault(name, {})["seconds"] = seconds
        return done

    def bench(self, name: str, args: list[str], timeout: float) -> dict | None:
        done = self.run(name, axiom("bench", *args, "--json"), timeout)
        if done is None:
            return None
        result = json.loads(done.stdout.strip().splitlines()[-1])
        self.record(name, {"ok": True, **result})
        return result

    def record(self, name: str, result: dict) -> None:
        self.results["parts"].setdefault(name, {}).update(result)
        if not result.get("ok", True):
            self.rows.append((name, result["error"], "", "FAILED"))
        self.write()

    def row(self, part: str, figure: str, target: str = "", met: bool | None = None) -> None:
        self.rows.append((part, figure, target, "" if met is None else ("met" if met else "missed")))
        self.write()

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=2) + "\n")
        lines = [
            f"GPU check ({'CPU smoke mode' if self.smoke else 'full'}), {self.results['started']}, "
            f"{self.results.get('device', '?')}, torch {self.results.get('torch', '?')}",
            "",
            "| part | figure | target | verdict |",
            "|---|---|---|---|",
            *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in self.rows),
        ]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def environment(check: Check) -> None:
    import torch

    cuda = torch.cuda.is_available()
    check.results.update(
        {
            "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "bitsandbytes": _version("bitsandbytes"),
            "transformers": _version("transformers"),
        }
    )
    check.write()


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def tests_on_cuda(check: Check) -> None:
    """The suite's device-parametrized tests, on CUDA (`-k cuda`: the ids of the `device` fixture's cuda runs)."""
    done = check.run("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"], 240)
    summary = done.stdout.strip().splitlines()[-1] if done is not None else "failed (see tests.log)"
    check.record("tests", {"ok": done is not None, "summary": summary})
    check.row("tests on CUDA (`pytest -k cuda`)", summary, "all pass", done is not None)


def memory_profile(check: Check, preset: str) -> None:
    """The card's settings at micro-batch 1: activation checkpointing, AdamW8bit, bf16 autocast."""
    sets = ["--set", "micro_batch_size=1", "--set", "grad_accum_steps=1"]
    args = ["train", "--preset", preset, *sets, "--warmup", "1", "--steps", "2", "--rounds", "1"]
    result = check.bench("memory", args, 300)
    if result is not None:
        peak = result["peak_mem_bytes"] / GIB
        part = f"memory, {preset} card settings, micro-batch 1"
        check.row(part, f"{peak:.2f} GiB peak", "<= 5 GB", peak <= 5e9 / GIB)


def throughput_sweep(check: Check, preset: str, batches: list[int], compiled: list[int]) -> None:
    """Training tokens/s and MFU by micro-batch, without activation checkpointing, fused AdamW; the first
    micro-batch also against transformers' Llama (same shapes, weights, optimizer, loss)."""
    for i, (mb, compile_) in enumerate([(b, False) for b in batches] + [(b, True) for b in compiled]):
        sets = [f"micro_batch_size={mb}", "grad_accum_steps=1", "gradient_checkpointing=false", "optimizer=adamw"]
        sets.append(f"compile={str(compile_).lower()}")
        args = ["train", "--preset", preset, *[x for s in sets for x in ("--set", s)], "--rounds", "3"]
        if i == 0:
            args.append("--vs-hf")
        name = f"train_mb{mb}{'_compiled' if compile_ else ''}"
        result = check.bench(name, args, 420 if compile_ else 240)
        if result is None:
            continue
        mfu = result.get("mfu")
        figure = f"{result['tokens_per_s']:,.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu else "")
        figure += f", {result['peak_mem_bytes'] / GIB:.1f} GiB"
        if "ratio_vs_hf" in result:
            figure += f", {result['ratio_vs_hf']:.2f}x transformers"
        target = "" if check.smoke else ">= 200k tok/s, 53% MFU"
        met = None if check.smoke else result["tokens_per_s"] >= 200_000
        check.row(f"train {preset}, micro-batch {mb}{', compiled' if compile_ else ''}", figure, target, met)


def decode_profile(check: Check, preset: str, batches: list[int]) -> None:
    """Where one decoding step's time goes at each batch size (`axiom bench generate --profile`, on the bench's
    default path: the compiled step replayed as a CUDA graph on CUDA, the eager one on the CPU): the host's time in
    ops, in Python and waiting for the device, and on CUDA the kernels, their device time and the launches. One
    process per batch size, each bounded, so that a slow compile costs one row, not the check."""
    for batch in batches:
        args = ["generate", "--preset", preset, "--batch", str(batch), "--new-tokens", "32", "--rounds", "1"]
        result = check.bench(f"decode_profile_b{batch}", [*args, "--profile"], 150)
        if result is None:
            continue
        p = result["decode_step_profile"]
        figure = f"{p['step_ms']:.3f} ms a step, {result['decoding']}; host: ops {p['host_ms']:.3f} ms, "
        figure += f"Python {p['python_ms']:.3f} ms, waits {p['wait_ms']:.3f} ms"
        if "kernels" in p:
            figure += f"; device: {p['kernel_ms']:.3f} ms in {p['kernels']:.0f} kernels, "
            figure += f"{p['kernel_launches']:.0f} kernel + {p['graph_launches']:.0f} graph launches"
        check.row(f"decode step {preset}, batch {batch} (profile)", figure)


def decode(check: Check, preset: str, new_tokens: int) -> None:
    """Batch-1 decoding vs transformers' generate on the bench's default path: bf16 on CUDA, the compiled step
    replayed as a CUDA graph; on the CPU (smoke mode) the eager one, which compiles nothing."""
    args = ["generate", "--preset", preset, "--vs-hf", "--new-tokens", str(new_tokens), "--rounds", "3"]
    result = check.bench("decode", args, 420)
    if result is not None:
        figure = f"{result['tokens_per_s']:,.0f} tok/s, {result['ratio_vs_hf']:.2f}x transformers"
        met = None if check.smoke else result["tokens_per_s"] >= 1500
        check.row(f"decode {preset}, batch 1", figure, "" if check.smoke else ">= 1,500 tok/s bf16", met)


def training_run(check: Check, preset: str, corpus: Path, steps: int, sets: list[str]) -> None:
    """A real run: prepare the corpus, train `steps` steps (the preset's optimizer, bf16, activation checkpointing),
    and report the loss curve and throughput from the run's own csvs."""
    work = check.out / "run"
    shutil.rmtree(work, ignore_errors=True)
    data, run = work / "data", work / "run"
    if check.run("prepare", axiom("prepare", str(corpus), "--out", str(data), "--val-fraction", "0.02"), 300) is None:
        return
    overrides = [f"max_steps={steps}", *sets]
    done = check.run(
        "training", axiom("train", "--preset", preset, "--data", str(data), "--out", str(run),
                          *[x for s in overrides for x in ("--set", s)]), 480
    )  # fmt: skip
    if done is None:
        return
    with open(run / "train.csv", newline="") as f:
        steps_rows = list(csv.DictReader(f))
    with open(run / "eval.csv", newline="") as f:
        evals = list(csv.DictReader(f))
    rates = [float(r["tokens_per_s"]) for r in steps_rows[1:]] or [float(steps_rows[0]["tokens_per_s"])]
    first, last = float(evals[0]["val_loss"]), float(evals[-1]["val_loss"])
    plan = next((x for x in (run / "train.log").read_text().splitlines() if x.startswith("optimizer")), "")
    optimizer = plan.removeprefix("optimizer").split(", betas")[0].strip()  # e.g. "AdamW8bit (bitsandbytes)"
    check.record(
        "training",
        {
            "ok": True,
            "val_loss": [float(r["val_loss"]) for r in evals],
            "train_loss_first_last": [float(steps_rows[0]["loss"]), float(steps_rows[-1]["loss"])],
            "tokens_per_s_median": sorted(rates)[len(rates) // 2],
            "optimizer": optimizer,
        },
    )
    figure = f"val loss {first:.3f} -> {last:.3f}, {sorted(rates)[len(rates) // 2]:,.0f} tok/s median"
    check.row(f"train {preset}, {steps} steps on {corpus.name}, {optimizer}", figure, "loss falls", last < first)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # gigabytes at full size; the csvs and log stay


def parts(smoke: bool, corpus: Path) -> dict[str, Callable[[Check], None]]:
    """The check's parts by name, in the order they run: on one H100/H200, or at CPU sizes in smoke mode (what a
    test can afford, so that this script cannot rot; no CUDA tests there)."""
    if smoke:
        sets = ["eval_interval=2", "eval_tokens=2048", "checkpoint_interval=4"]
        return {
            "decode_profile": lambda check: decode_profile(check, "tiny", batches=[1, 16]),
            "memory": lambda check: memory_profile(check, "tiny"),
            "throughput": lambda check: throughput_sweep(check, "tiny", batches=[2], compiled=[]),
            "decode": lambda check: decode(check, "tiny", new_tokens=8),
            "training": lambda check: training_run(check, "tiny", corpus, 4, sets),
        }
    sets = ["micro_batch_size=16", "grad_accum_steps=1", "warmup_steps=20", "eval_interval=50"]
    sets += ["eval_tokens=65536", "checkpoint_interval=200"]
    return {
        "decode_profile": lambda check: decode_profile(check, "axiom-380m", batches=[1, 16]),  # what decoding needs
        "tests": tests_on_cuda,
        "memory": lambda check: memory_profile(check, "axiom-380m"),
        "throughput": lambda check: throughput_sweep(check, "axiom-380m", batches=[16, 8, 32], compiled=[16]),
        "decode": lambda check: decode(check, "axiom-380m", new_tokens=256),
        "training": lambda check: training_run(check, "axiom-380m", corpus, 200, sets),
    }


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json, gpu_check.md and one log per part")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check: tiny preset, seconds per part")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "english-mix",
        help="text for the training run (default: ../shared/data/english-mix)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=540,
        help="seconds for the whole check; each part gets what is left (default: 540, under the device tool's 10 "
        "minutes per command, so that a slow part cuts the check short instead of losing it)",
    )
    parser.add_argument(
        "--parts",
        default=None,
        help="comma-separated parts to run, in the check's order (default: all): decode_profile, tests (not in "
        "smoke mode), memory, throughput, decode, training",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    todo = parts(args.smoke, args.corpus)
    wanted = set(todo) if args.parts is None else set(args.parts.split(","))
    if wanted - set(todo):
        print(f"gpu_check: --parts {args.parts}: choose among {', '.join(todo)}")
        return 2
    if "training" in wanted and not args.corpus.exists():
        print(f"gpu_check: --corpus {args.corpus} not found; pass a folder or file of text (parquet/jsonl/txt)")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.smoke, args.budget)
    environment(check)
    if args.smoke:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    else:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is visible; use --smoke for the CPU check")
            return 2
    for name, part in todo.items():
        if name in wanted:
            part(check)
    check.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    check.write()
    print((args.out / "gpu_check.md").read_text())
    failed = [name for name, part in check.results["parts"].items() if part.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
