"""Throughput of `axiom prepare` with 1 and N workers, beside tiktoken's own single-thread rate on the same text.

    python scripts/bench_prepare.py ../shared/data/tech-docs --workers 2 --repeat 3

MB are 10^6 bytes of UTF-8 document text. The target (issue 3): N workers reach at least 0.8 x N x tiktoken's
single-thread rate. Wall times include starting the worker processes, as a user would see them.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import platform
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from axiom.data import sources
from axiom.errors import run_script
from axiom.text.tokenizer import load_tokenizer

# axiom.data.prepare is imported inside functions: spawned workers re-import this script, and prepare's import of the
# loader brings in torch, which would add a second of start-up to every worker.


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (prepare's workers once joined)."""
    return sum(
        r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def tiktoken_rate(inputs: list[str], text_field: str) -> tuple[float, float, float, int]:
    """(MB/s, tokens/s, MB per CPU-second, text bytes) of encode_ordinary in this one thread, texts in memory."""
    texts = [
        t
        for unit in sources.plan_units(sources.resolve_inputs(inputs), text_field)
        for t in sources.read_unit(unit, text_field)
        if t
    ]
    enc = load_tokenizer()
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    start, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(len(enc.encode_ordinary(t)) for t in texts)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    return nbytes / 1e6 / elapsed, tokens / elapsed, nbytes / 1e6 / cpu, nbytes


def prepare_rate(inputs: list[str], out: Path, workers: int, text_field: str) -> tuple[float, float, float]:
    """(MB/s, tokens/s, MB per CPU-second of all processes) of a full `prepare` run."""
    from axiom.data.prepare import prepare

    start, cpu = time.perf_counter(), cpu_seconds()
    m = prepare(inputs, out, workers=workers, text_field=text_field)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    nbytes, tokens = m["train_bytes"] + m["val_bytes"], m["train_tokens"] + m["val_tokens"]
    return nbytes / 1e6 / elapsed, tokens / elapsed, nbytes / 1e6 / cpu


def main(argv: list[str] | None = None) -> None:
    from axiom.data.prepare import default_workers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="corpus files or directories (as for axiom prepare)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="N (default: all cores)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="prepare K copies of the corpus, so that worker start-up (~0.5 s) is "
        "amortised as on a real corpus; tiktoken's rate is per byte and measured once",
    )
    args = parser.parse_args(argv)

    cpu = platform.processor() or platform.machine()
    print(f"machine: {os.cpu_count()} CPUs ({cpu}), {platform.python_implementation()} {platform.python_version()}")
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    mb_s, tok_s, mb_cpu, nbytes = tiktoken_rate(args.inputs, args.text_field)
    print(f"corpus: {' '.join(args.inputs)}: {nbytes / 1e6:.1f} MB of text")
    rows = [("tiktoken encode_ordinary, 1 thread", mb_s, tok_s, mb_cpu)]
    with tempfile.TemporaryDirectory() as tmp:
        inputs = args.inputs
        if args.repeat > 1:
            files = sources.resolve_inputs(args.inputs)
            for k in range(args.repeat):
                (Path(tmp) / "corpus" / str(k)).mkdir(parents=True)
                for i, f in enumerate(files):
                    shutil.copy(f, Path(tmp) / "corpus" / str(k) / f"{i:04d}_{f.name}")
            inputs = [str(Path(tmp) / "corpus")]
            print(f"prepared below: {args.repeat} copies, {args.repeat * nbytes / 1e6:.1f} MB of text")
        for n in sorted({1, args.workers}):
            rows.append(
                (
                    f"axiom prepare, {n} worker{'s' * (n > 1)}",
                    *prepare_rate(inputs, Path(tmp) / f"w{n}", n, args.text_field),
                )
            )
        if args.workers != 1:
            same = all(
                filecmp.cmp(p, Path(tmp) / f"w{args.workers}" / p.name, shallow=False)
                for p in (Path(tmp) / "w1").iterdir()
            )
            print(f"outputs of 1 and {args.workers} workers byte-identical: {same}")
    print(f"{'':<36} {'MB/s':>8} {'tokens/s':>12} {'MB/CPU-s':>9}")
    for name, mb, tok, per_cpu in rows:
        print(f"{name:<36} {mb:>8.2f} {tok:>12,.0f} {per_cpu:>9.2f}")
    ratio = rows[-1][1] / (args.workers * mb_s)
    print(f"{args.workers} workers / ({args.workers} x tiktoken 1-thread) = {ratio:.2f} (target >= 0.8)")
    # Where other jobs hold cores, wall rates understate; work per CPU-second shows the overhead alone.
    print(f"CPU efficiency of {args.workers} workers vs tiktoken: {rows[-1][3] / mb_cpu:.2f}")
    print("load after: ", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    run_script(main)
