"""Every GPU figure the project still lacks, in one run: see scripts/gpu_check.sh (the entry point) and
docs/benchmarks.md ("A GPU check in one command").

Each part runs the project's own commands (`pytest`, `axiom bench`, `axiom prepare`, `axiom train`,
scripts/profile_step.py) in a subprocess with a time limit, so one failure or out-of-memory cannot take the others
down; a part that fails is reported as such. Results go to OUT/gpu_check.json (everything) and OUT/gpu_check.md (one
table), written as they come, so a run cut short still leaves what it measured. The default parts fit the default
budget of 6 minutes (twice in a quarter of an hour of GPU time); --parts adds the others.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

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

    def run(
        self, name: str, cmd: list[str], timeout: float, cwd: Path = ROOT, cut_ok: bool = False
    ) -> subprocess.CompletedProcess | None:
        """A command of a part; its output goes to OUT/NAME.log. None (and the part marked failed) on failure. It
        runs for at most its own `timeout` and what is left of the check's budget, not at all with too little left.
        `cut_ok`: a command stopped by its time limit is not a failure (a run read from the files it wrote so far):
        its result has returncode None."""
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
            log.write_text(f"$ {' '.join(cmd)}\n{_text(e.stdout)}\n{_text(e.stderr)}\nTIMEOUT after {timeout:.0f} s\n")
            if cut_ok:
                self.results["parts"].setdefault(name, {}).update(seconds=round(timeout, 1), cut=True)
                return subprocess.CompletedProcess(cmd, None, _text(e.stdout), _text(e.stderr))
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
        if not result.get("ok", True) and "error" in result:
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


def _text(output: bytes | str | None) -> str:
    """What a timed-out command printed (bytes, even with text=True, on some Pythons)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


class Sizes(NamedTuple):
    """What the parts run: the card on a GPU, or the tiny preset on a CPU (--smoke)."""

    preset: str
    shipped_steps: int  # optimizer steps of the run as shipped
    shipped_sets: list[str]  # on top of max_steps (none for the card: exactly as shipped)
    shipped_timeout: float
    eager_micro_batch: int
    sweep: list[int]  # micro-batches of the throughput sweep, eager
    sweep_compiled: list[int]
    new_tokens: int  # decoded per prompt
    long_prompt: int  # tokens of the prompt whose prefill is timed (the context less a few new tokens)
    profile_warmup: int
    serve_clients: list[int]  # concurrent streaming clients of the load test, one level each
    corpus: Path | None = None  # the text of the run as shipped (--corpus)


FULL = Sizes(
    preset="axiom-380m",
    shipped_steps=50,
    shipped_sets=[],
    shipped_timeout=170,
    eager_micro_batch=16,
    sweep=[16, 8, 32],
    sweep_compiled=[16],
    new_tokens=256,
    long_prompt=1000,
    profile_warmup=3,
    serve_clients=[1, 16, 64],
)
SMOKE = Sizes(
    preset="tiny",
    shipped_steps=4,
    shipped_sets=["micro_batch_size=auto", "grad_accum_steps=4", "eval_interval=2", "eval_tokens=2048"],
    shipped_timeout=300,
    eager_micro_batch=2,
    sweep=[2],
    sweep_compiled=[],
    new_tokens=8,
    long_prompt=200,
    profile_warmup=1,
    serve_clients=[1, 2],
)
CARD_LITERAL = ["micro_batch_size=1", "gradient_checkpointing=true", "compile=false"]


def sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def tests_on_cuda(check: Check, sizes: Sizes) -> None:
    """The suite's device-parametrized tests, on CUDA (`-k cuda`: the ids of the `device` fixture's cuda runs). A
    run its time limit cuts is summed up from pytest's progress characters; a failing run is reported by `run`."""
    done = check.run(
        "tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda"], 240, cut_ok=True
    )
    if done is None:
        return
    if done.returncode is None:
        marks = "".join(line.split(" [")[0] for line in done.stdout.splitlines() if PYTEST_PROGRESS.match(line))
        summary = f"cut by its time limit after {marks.count('.')} passed, {marks.count('F') + marks.count('E')} failed"
        ok = "F" not in marks and "E" not in marks
    else:
        summary, ok = done.stdout.strip().splitlines()[-1], True
    check.record("tests", {"ok": ok, "summary": summary})
    finished = done.returncode is not None
    check.row(
        "tests on CUDA (`pytest -k cuda`)", summary, "all pass", False if not ok else (True if finished else None)
    )


PYTEST_PROGRESS = re.compile(r"^[.FEsxX]+( +\[ *\d+%\])?$")  # a line of `pytest -q`'s progress


def memory_profile(check: Check, sizes: Sizes) -> None:
    """The card's literal settings (micro-batch 1, activation checkpointing, eager; AdamW8bit, bf16 autocast), two
    micro-batches a step: the second one's forward holds the first one's gradients, as in the card's 320."""
    literal = [*CARD_LITERAL, "grad_accum_steps=2"]
    args = ["train", "--preset", sizes.preset, *sets(literal), "--warmup", "1", "--steps", "2", "--rounds", "1"]
    result = check.bench("memory", args, 60 if not check.smoke else 300)
    if result is not None:
        peak = result["peak_mem_bytes"] / GIB
        part = f"memory, {sizes.preset} card's literal settings, micro-batch 1 x 2"
        check.row(part, f"{peak:.2f} GiB peak", "<= 5 GB", peak <= 5e9 / GIB)


def eager_vs_transformers(check: Check, sizes: Sizes) -> None:
    """Our eager step (compile=false) against transformers' Llama, same shapes, weights, optimizer and loss."""
    mb = sizes.eager_micro_batch
    literal = [f"micro_batch_size={mb}", "grad_accum_steps=1", "gradient_checkpointing=false", "compile=false"]
    args = ["train", "--preset", sizes.preset, *sets([*literal, "optimizer=adamw"]), "--vs-hf", "--rounds", "2"]
    result = check.bench("eager", args, 90 if not check.smoke else 300)
    if result is not None:
        figure = f"{result['tokens_per_s']:,.0f} tok/s, {result['ratio_vs_hf']:.2f}x transformers"
        met = None if check.smoke else result["ratio_vs_hf"] >= 1.5
        check.row(f"train {sizes.preset} eager, micro-batch {mb}", figure, "" if check.smoke else ">= 1.5x", met)


def throughput_sweep(check: Check, sizes: Sizes) -> None:
    """Training tokens/s and MFU by micro-batch, without activation checkpointing, fused AdamW, eager then
    compiled."""
    for mb, compile_ in [(b, False) for b in sizes.sweep] + [(b, True) for b in sizes.sweep_compiled]:
        literal = [f"micro_batch_size={mb}", "grad_accum_steps=1", "gradient_checkpointing=false", "optimizer=adamw"]
        literal.append(f"compile={str(compile_).lower()}")
        args = ["train", "--preset", sizes.preset, *sets(literal), "--rounds", "3"]
        name = f"train_mb{mb}{'_compiled' if compile_ else ''}"
        result = check.bench(name, args, 420 if compile_ else 240)
        if result is None:
            continue
        mfu = result.get("mfu")
        figure = f"{result['tokens_per_s']:,.0f} tok/s" + (f", MFU {mfu:.1%}" if mfu else "")
        figure += f", {result['peak_mem_bytes'] / GIB:.1f} GiB"
        check.row(f"train {sizes.preset}, micro-batch {mb}{', compiled' if compile_ else ''}", figure)


def decode_profile(check: Check, sizes: Sizes) -> None:
    """Where one decoding step's time goes at batch 1 and 16 (`axiom bench generate --profile`, on the bench's
    default path: the compiled step replayed as a CUDA graph on CUDA, the eager one on the CPU): the host's time in
    ops, in Python and waiting for the device, and on CUDA the kernels, their device time and the launches. One
    process per batch size, each bounded, so that a slow compile costs one row, not the check."""
    for batch in (1, 16):
        args = ["generate", "--preset", sizes.preset, "--batch", str(batch), "--new-tokens", "32", "--rounds", "1"]
        # batch 1's first compile tunes its products (coordinate descent): longer, unless the compile cache is warm
        result = check.bench(f"decode_profile_b{batch}", [*args, "--profile"], 150 if batch == 1 else 90)
        if result is None:
            continue
        p = result["decode_step_profile"]
        figure = (
            f"{p['step_ms']:.3f} ms a step, {result['decoding']}{_attention(result)}; host: ops {p['host_ms']:.3f} ms, "
        )
        figure += f"Python {p['python_ms']:.3f} ms, waits {p['wait_ms']:.3f} ms"
        if "kernels" in p:
            figure += f"; device: {p['kernel_ms']:.3f} ms in {p['kernels']:.0f} kernels, "
            figure += f"{p['kernel_launches']:.0f} kernel + {p['graph_launches']:.0f} graph launches"
        check.row(f"decode step {sizes.preset}, batch {batch} (profile)", figure)


def _attention(result: dict) -> str:
    """How a compiled step attended, for its row: through flex_attention, or SDPA (on a GPU: flex_attention did not
    compile, and the part's log has the warning)."""
    if not result["compile"]:
        return ""
    return ", flex_attention" if result["flex_attention"] else ", SDPA, not flex_attention"


def loss_kernels(check: Check, sizes: Sizes) -> None:
    """The training loss alone through each loss kernel the device runs (ours, and liger-kernel's and
    cut-cross-entropy's where installed) beside the plain loss (`axiom bench loss`): time and peak memory, at a
    micro-batch of 16 sequences on CUDA."""
    args = ["loss", "--preset", sizes.preset, *(["--rows", "256", "--rounds", "1", "--units", "1"] * check.smoke)]
    result = check.bench("loss", args, 120 if not check.smoke else 300)
    if result is None:
        return
    for kernel, k in result["kernels"].items():
        mem = k["peak_extra_bytes"]
        figure = f"{k['ms']:.1f} ms, {k['speedup_vs_plain']:.2f}x plain" + (f", +{mem / GIB:.2f} GiB" if mem else "")
        figure += f"; gradients {max(k['grad_hidden_rel_diff'], k['grad_weight_rel_diff']):.1e} from plain's"
        check.row(f"loss {kernel}, {result['rows']:,} tokens, {result['dtype']}", figure)
    for kernel, why in result["skipped"].items():
        check.row(f"loss {kernel}", f"skipped: {why}")
    ours = result["kernels"]["chunked"]["ms"]
    fastest = min((k for k in result["kernels"] if k != "plain"), key=lambda k: result["kernels"][k]["ms"])
    figure = f"{fastest}, {ours / result['kernels'][fastest]['ms']:.2f}x ours"
    check.row("fastest loss kernel (axiom.train.plan.AUTO_LOSS_KERNEL)", figure)


def decode(check: Check, sizes: Sizes) -> None:
    """Batch-1 decoding vs transformers' generate: bf16 on CUDA, compiled step replayed as a CUDA graph (the
    smoke mode decodes eagerly: compiling on a CPU takes longer than the rest of the check). Then the prefill of a
    prompt near the context length, warm: eager, as every engine prefills, so nothing is compiled for it."""
    args = ["generate", "--preset", sizes.preset, "--vs-hf", "--new-tokens", str(sizes.new_tokens), "--rounds", "3"]
    if check.smoke:
        args.append("--eager")
    result = check.bench("decode", args, 420)
    if result is not None:
        figure = f"{result['tokens_per_s']:,.0f} tok/s, {result['ratio_vs_hf']:.2f}x transformers; first token "
        figure += f"{result['first_token_ms']:.1f} ms warm{_attention(result)}"
        # about half of what reading the weights once a token allows: ~6,200 tok/s on an H200, ~4,300 on an H100
        target = 3000 if "H200" in result.get("device_name", "") else 2000
        met = None if check.smoke else result["tokens_per_s"] >= target
        check.row(f"decode {sizes.preset}, batch 1", figure, "" if check.smoke else f">= {target:,} tok/s bf16", met)
    args = ["generate", "--preset", sizes.preset, "--eager", "--prompt-len", str(sizes.long_prompt)]
    result = check.bench("prefill", [*args, "--new-tokens", "2", "--rounds", "3"], 120)
    if result is not None:
        figure = f"{result['first_token_ms']:.1f} ms to the first token, warm ({result['dtype']})"
        check.row(f"prefill {sizes.preset}, {sizes.long_prompt:,} tokens, batch 1", figure)


def ttft(check: Check, sizes: Sizes) -> None:
    """Time to first token of a fresh process (scripts/ttft.py), bf16 with the compiled step on CUDA (eager in the
    smoke mode): cold, with an empty compile cache, then warm, the same cache again."""
    cache = check.out / "ttft-cache"
    shutil.rmtree(cache, ignore_errors=True)
    dtype = ["--dtype", "float32"] if check.smoke else ["--dtype", "bfloat16", "--compile", "--cache-dir", str(cache)]
    cmd = [sys.executable, "scripts/ttft.py", "--preset", sizes.preset, *dtype, "--new-tokens", "8"]
    for when in ("cold", "warm"):
        done = check.run(f"ttft_{when}", cmd, 240 if not check.smoke else 300)
        if done is None:
            return
        r = json.loads(done.stdout.strip().splitlines()[-1])
        check.record(f"ttft_{when}", {"ok": True, **r})
        figure = f"process start to first token {r['process_to_first_token_s']:.1f} s, to the second "
        figure += f"{r['process_to_second_token_s']:.1f} s (model ready in {r['model_ready_s']:.1f} s), then "
        figure += f"{r['decode_tokens_per_s_after']:,.0f} tok/s"
        check.row(f"time to first token, {sizes.preset} {dtype[1]}, {when}", figure)
    shutil.rmtree(cache, ignore_errors=True)


def serve(check: Check, sizes: Sizes) -> None:
    """`axiom serve` under load (scripts/load_test.py): streaming greedy clients at each concurrency, bf16 with the
    compiled step (CUDA graphs) on CUDA, beside `transformers serve --continuous-batching` on a Llama export of the
    same weights where it can run: tokens/s, time to first token and between tokens, and every text checked against
    the prompt decoded alone (a mismatch fails the part; its log keeps the figures)."""
    clients = [str(n) for n in sizes.serve_clients]
    cmd = [sys.executable, "scripts/load_test.py", "--preset", sizes.preset, "--stream", "--no-baseline", "--json"]
    cmd += ["--concurrency", *clients, "--max-batch", clients[-1], "--rounds", "1"]
    if check.smoke:
        cmd += ["--device", "cpu", "--requests", "1", "--max-tokens", "4"]
    else:
        cmd += ["--device", "cuda", "--dtype", "bfloat16", "--compile"]
        import load_test  # beside this script, which runs with scripts/ first on sys.path

        if load_test.transformers_serve_missing() is None:
            cmd.append("--vs-transformers-serve")
    done = check.run("serve", cmd, 300)
    if done is None:
        return
    result = json.loads(done.stdout[done.stdout.index("{") :])
    check.record("serve", {"ok": True, **result})
    for level in result["levels"]:
        ours = level["servers"]["batched"]
        figure = f"{_serving(ours)}; {ours['same_text']}/{ours['completed']} texts as decoded alone"
        if theirs := level["servers"].get("transformers_serve"):
            figure += f"; {level['axiom_vs_transformers']:.2f}x transformers serve ({_serving(theirs)})"
        n = level["concurrency"]
        check.row(f"axiom serve {sizes.preset}, {n} streaming client{'s' if n > 1 else ''}", figure)


def _serving(server: dict) -> str:
    first, between = server["ttft_p50_s"] * 1e3, server["itl_p50_s"] * 1e3
    return f"{server['tokens_per_s']:,.0f} tok/s, first token p50 {first:.0f} ms, between tokens p50 {between:.1f} ms"


def kernels(check: Check, sizes: Sizes) -> None:
    """torch.profiler over one step of the preset as `axiom train` plans it (compiled on CUDA): the top kernels
    (OUT/kernels/kernels.txt), host vs device time per step."""
    cmd = [sys.executable, "scripts/profile_step.py", str(check.out / "kernels"), "--preset", sizes.preset]
    done = check.run("kernels", [*cmd, "--warmup", str(sizes.profile_warmup)], 100 if not check.smoke else 300)
    if done is None:
        return
    result = json.loads(done.stdout.strip().splitlines()[-1])
    check.record("kernels", {"ok": True, **result})
    top = ", ".join(f"{k['name'][:40]} {k['ms']:.1f} ms" for k in result["top"][:3])
    if result["device_s"] is None:
        check.row(f"one step of {sizes.preset}, profiled", f"{result['wall_s'] * 1e3:.0f} ms on the CPU; top: {top}")
        return
    host, device = result["host_s"] * 1e3, result["device_s"] * 1e3
    figure = f"host {host:.0f} ms, GPU {device:.0f} ms, {result['launches']:,} launches; top: {top}"
    check.row(f"one step of {sizes.preset} as planned, profiled", figure, "host < GPU", host < device)


def shipped_run(check: Check, sizes: Sizes) -> None:
    """`axiom train --preset P` exactly as shipped (for the card: nothing set but the run's length): the plan it
    resolves, tokens/s, MFU and peak memory from its own train.log and train.csv, read also when the time limit
    cut the run, and whether the val loss fell."""
    work = check.out / "run"
    shutil.rmtree(work, ignore_errors=True)
    data, run = work / "data", work / "run"
    prepare = axiom("prepare", str(sizes.corpus), "--out", str(data), "--val-fraction", "0.02")
    if check.run("prepare", prepare, 300) is None:
        return
    cmd = axiom("train", "--preset", sizes.preset, "--data", str(data), "--out", str(run))
    overrides = [f"max_steps={sizes.shipped_steps}", *sizes.shipped_sets]
    done = check.run("shipped", [*cmd, *sets(overrides)], sizes.shipped_timeout, cut_ok=True)
    if done is None:
        return
    if done.returncode is None and not (run / "train.csv").exists():
        check.record("shipped", {"ok": False, "error": "cut by its time limit before its first progress line"})
        return
    record = shipped_figures(run)
    check.record("shipped", {"ok": True, **record})
    _shipped_rows(check, sizes, record)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)  # gigabytes at full size; the csvs and log stay


PROGRESS = re.compile(
    r"^step ([\d,]+)/[\d,]+ \|.*\| ([\d,]+) tok/s(?: \| mfu ([\d.]+)%)?(?: \| peak mem ([\d.]+) GiB)?"
)


def shipped_figures(run: Path) -> dict:
    """What a run's own files say: the plan lines, steps done, tokens/s (the median of the progress lines after the
    first, which holds the compiling), MFU, peak memory, the val losses and the optimizer."""
    log = (run / "train.log").read_text().splitlines()
    progress = [m.groups() for m in map(PROGRESS.match, log) if m]
    steady = progress[1:] or progress
    rates = sorted(float(p[1].replace(",", "")) for p in steady)
    mfus = sorted(float(p[2]) for p in steady if p[2])
    evals = []
    if (run / "eval.csv").exists():
        with open(run / "eval.csv", newline="") as f:
            evals = [float(r["val_loss"]) for r in csv.DictReader(f)]
    with open(run / "train.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    optimizer = next((x for x in log if x.startswith("optimizer")), "").removeprefix("optimizer").split(", betas")[0]
    return {
        "plan": [x.removeprefix("plan").strip() for x in log if x.startswith("plan ")],
        "steps": int(steps[-1]["step"]) if steps else 0,
        "tokens_per_s_median": rates[len(rates) // 2] if rates else None,
        "mfu_median": mfus[len(mfus) // 2] / 100 if mfus else None,
        "peak_mem_gib": float(progress[-1][3]) if progress and progress[-1][3] else None,
        "val_loss": evals,
        "train_loss_first_last": [float(steps[0]["loss"]), float(steps[-1]["loss"])] if steps else [],
        "optimizer": optimizer.strip(),
    }


def _shipped_rows(check: Check, sizes: Sizes, r: dict) -> None:
    cut = " (cut by time)" if check.results["parts"]["shipped"].get("cut") else ""
    part = f"train {sizes.preset} as shipped, {r['steps']} steps{cut} on {sizes.corpus.name}"
    rate = r["tokens_per_s_median"]
    figure = f"{rate:,.0f} tok/s median" if rate else "no steady progress line"
    if r["mfu_median"]:
        figure += f", MFU {r['mfu_median']:.1%}"
    if r["peak_mem_gib"]:
        figure += f", {r['peak_mem_gib']:.1f} GiB peak"
    if rate and not check.smoke:
        figure += f"; the card's 8B tokens in {8e9 / rate / 3600:.1f} h"
    target = "" if check.smoke else ">= 200k tok/s, 53% MFU"
    check.row(part, figure, target, None if check.smoke or not rate else rate >= 200_000)
    check.row(f"plan of {sizes.preset} as shipped", "; ".join(r["plan"][:1]) or "no plan line")
    if len(r["val_loss"]) >= 2:
        first, last = r["val_loss"][0], r["val_loss"][-1]
        check.row(f"val loss of that run, {r['optimizer']}", f"{first:.3f} -> {last:.3f}", "loss falls", last < first)


PARTS = {
    "shipped": shipped_run,
    "kernels": kernels,
    "memory": memory_profile,
    "eager": eager_vs_transformers,
    "tests": tests_on_cuda,
    "sweep": throughput_sweep,
    "decode": decode,
    "decode_profile": decode_profile,
    "ttft": ttft,
    "loss": loss_kernels,
    "serve": serve,
}
# The preset as shipped first, then where a decoding step's time goes (its code is the newest), then the rest; the
# budget (6 minutes) cuts what does not fit, the training profile last.
DEFAULT_PARTS = "shipped,decode_profile,memory,eager,kernels"
SMOKE_PARTS = "shipped,kernels,memory,eager,decode,decode_profile,ttft,loss,serve"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        default=360,
        help="seconds for the whole check; each part gets what is left (default: 360, so that the check runs twice "
        "in a quarter of an hour of GPU time and a slow part cuts it short instead of losing it)",
    )
    parser.add_argument(
        "--parts",
        default=None,
        help=f"comma-separated, in order, from {', '.join(PARTS)} (default: {DEFAULT_PARTS}; --smoke: {SMOKE_PARTS})",
    )
    args = parser.parse_args(argv)
    if not args.budget > 0:  # nan too: every part would run to its own limit
        parser.error(f"--budget {args.budget:g}: a number of seconds above 0")
    parts = (args.parts or (SMOKE_PARTS if args.smoke else DEFAULT_PARTS)).split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        print(f"gpu_check: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
        return 2
    if "shipped" in parts and not args.corpus.exists():
        print(f"gpu_check: --corpus {args.corpus} not found; pass a folder or file of text (parquet/jsonl/txt)")
        return 2
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is visible; use --smoke for the CPU check")
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out, args.smoke, args.budget)
    environment(check)
    if args.smoke:  # the same parts at CPU sizes: what a test can afford, so this script cannot rot
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sizes = (SMOKE if args.smoke else FULL)._replace(corpus=args.corpus)
    for part in parts:
        PARTS[part](check, sizes)
    check.results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    check.write()
    print((args.out / "gpu_check.md").read_text())
    failed = [name for name, part in check.results["parts"].items() if part.get("ok") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
