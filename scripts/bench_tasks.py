"""Multiple-choice scoring speed: Axiom's native scorer against lm-eval-harness on the `axiom export` of the same
model (`lm_eval --model hf`, in-process), on the same items, in one process with interleaved rounds (ABBA).

Also times lm-eval's own pipeline with the Axiom adapter (`AxiomLM`), to show what the harness itself costs, and
prints the acc and acc_norm each gives, to compare.

    python scripts/bench_tasks.py --task-file runs/demo/kjv_choices.jsonl --limit 200 --rounds 2
    python scripts/bench_tasks.py --task-file hellaswag_val.jsonl --ckpt RUN/checkpoints/best --limit 500

Without --ckpt the model is the --preset (default tiny) with random weights: speed does not depend on them.
On a machine that other jobs keep busy, run with OMP_WAIT_POLICY=PASSIVE (as `make demo` does): spinning OpenMP
threads that wait for a descheduled sibling make every small op cost milliseconds, which says nothing about either
contender.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from axiom.config import get_config
from axiom.errors import run_script
from axiom.eval.tasks import Item, choice_loglikelihoods, encode_pair, read_task_file, score
from axiom.interop.export import export
from axiom.model.checkpoint import load_model, save_weights
from axiom.model.transformer import Axiom


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task-file", required=True, type=Path, help="multiple-choice JSONL (either format)")
    parser.add_argument("--ckpt", help="checkpoint to score with (default: a random --preset model)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--limit", type=int, help="first N items")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each timing every contender once (ABBA)")
    parser.add_argument("--batch-size", type=int, default=16, help="native scorer: contexts per pass")
    parser.add_argument("--hf-batch-size", type=int, default=32, help="lm-eval's HF model: requests per pass")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    for name in ("limit", "rounds", "batch_size", "hf_batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def contenders(args: argparse.Namespace, items: list[Item], tmp: Path) -> dict[str, Callable[[], object]]:
    """The three scorers of `items`, each a call that returns its (acc, acc_norm) or TaskResult."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from axiom.eval.harness import AxiomLM, json_task

    if args.ckpt:
        ckpt = args.ckpt
    else:
        cfg = get_config(args.preset)
        torch.manual_seed(0)
        ckpt = tmp / "ckpt"
        ckpt.mkdir()
        save_weights(Axiom(cfg.model).state_dict(), cfg, ckpt, step=0, tokens=0)
    model = load_model(ckpt)[0].eval()
    folder = export(ckpt, tmp / "hf", "axiom")
    hf = HFLM(
        pretrained=str(folder), trust_remote_code=True, dtype="float32", device="cpu", batch_size=args.hf_batch_size
    )
    jsonl = tmp / "items.jsonl"  # the same items in the generic format, for lm-eval's json task
    rows = ({"context": i.context, "choices": i.choices, "answer": i.label} for i in items)
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = json_task(args.task_file.stem, jsonl)
    manager = TaskManager(include_defaults=False)

    def native():
        return score("x", items, choice_loglikelihoods(model, items, args.batch_size))

    def harness(lm):
        res = simple_evaluate(model=lm, tasks=[task], task_manager=manager, log_samples=False)
        r = res["results"][task["task"]]
        return r["acc,none"], r["acc_norm,none"]

    return {
        "native": native,
        "lm-eval + HF export": lambda: harness(hf),
        "lm-eval + AxiomLM": lambda: harness(AxiomLM(model, batch_size=args.batch_size)),
    }


def report(items: list[Item], results: dict, times: dict[str, list[float]]) -> None:
    native_res = results["native"]
    order = list(times)
    ctx = [len(encode_pair(i.context, " " + i.choices[0])[0]) for i in items]
    cont = [len(encode_pair(i.context, " " + c)[1]) for i in items for c in i.choices]
    print(
        f"{len(items)} items, {len(cont)} choices; context {statistics.mean(ctx):.1f} tokens, choice "
        f"{statistics.mean(cont):.1f} tokens on average; torch threads {torch.get_num_threads()}"
    )
    print(f"acc / acc_norm: native {native_res.acc:.4f} / {native_res.acc_norm:.4f}", end="")
    for name in order[1:]:
        print(f", {name} {results[name][0]:.4f} / {results[name][1]:.4f}", end="")
    print()
    base = statistics.median(times["native"])
    for name in order:
        t = statistics.median(times[name])
        runs = ", ".join(f"{x:.2f}" for x in times[name])
        print(f"{name:<22} median {t:7.2f} s  ({runs})  {t / base:5.2f}x native's time")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets is imported: it reads them once
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    items = read_task_file(args.task_file)[: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        scorers = contenders(args, items, Path(tmp))
        results = {name: fn() for name, fn in scorers.items()}  # warm-up, and the numbers to compare
        times: dict[str, list[float]] = {name: [] for name in scorers}
        order = list(scorers)
        for r in range(args.rounds):
            for name in order if r % 2 == 0 else order[::-1]:  # ABBA: drift in machine load hits all alike
                start = time.perf_counter()
                scorers[name]()
                times[name].append(time.perf_counter() - start)
    report(items, results, times)


if __name__ == "__main__":
    run_script(main)
