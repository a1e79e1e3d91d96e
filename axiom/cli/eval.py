"""`axiom eval`: validation loss, perplexity and bits per byte of a checkpoint (`--data`, axiom/eval/loss.py), and
benchmark tasks: lm-eval-harness tasks in-process (`--tasks`, axiom/eval/harness.py) and local multiple-choice
files scored natively (`--task-file`, axiom/eval/tasks.py); docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict

import torch

from axiom.cli.args import add_device_argument
from axiom.config import Config
from axiom.data.loader import masks_documents, read_manifest
from axiom.errors import AxiomError, require
from axiom.eval.loss import EvalResult, evaluate
from axiom.eval.tasks import (
    TASK_BATCH,
    Item,
    choice_loglikelihoods,
    choice_requests,
    read_task_file,
    score,
    task_name,
)
from axiom.model.checkpoint import load_model
from axiom.runtime import pick_device
from axiom.text.tokenizer import EOS_ID


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint directory (e.g. RUN/checkpoints/best)")
    parser.add_argument("--data", help="prepared data directory (from axiom prepare): validation loss, ppl, bpb")
    parser.add_argument(
        "--tasks",
        help="comma-separated lm-eval-harness tasks run in-process, e.g. "
        "hellaswag,arc_easy,arc_challenge,piqa,winogrande,lambada_openai (data from the Hugging Face Hub or the "
        "datasets cache; needs the eval extra)",
    )
    parser.add_argument(
        "--task-file",
        action="append",
        default=[],
        metavar="PATH",
        help='local multiple-choice JSONL, each line {"context", "choices", "answer"} or HellaSwag\'s '
        '{"ctx", "endings", "label"}, scored natively with lm-eval\'s acc and acc_norm (repeatable)',
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    parser.add_argument("--num-fewshot", type=int, help="examples in each --tasks prompt (default: the task's, 0)")
    parser.add_argument("--eval-tokens", type=int, help="validation tokens (default: the checkpoint's eval_tokens)")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="sequences per batch for --data (default: its micro_batch_size); contexts per batch for tasks "
        f"(default: {TASK_BATCH})",
    )
    add_device_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object (the harness's numbers as is)")


def check_args(args: argparse.Namespace) -> list[str]:
    """One-line errors for flags that do not fit together, before anything loads; returns the --tasks names."""
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if not (args.data or tasks or args.task_file):
        raise AxiomError("nothing to evaluate: pass --data DIR, --tasks NAMES or --task-file PATH")
    for flag, value in (("--eval-tokens", args.eval_tokens), ("--batch-size", args.batch_size)):
        if value is not None and value <= 0:
            raise AxiomError(f"{flag} {value}: must be positive")
    if args.limit is not None and args.limit <= 0:
        raise AxiomError(f"--limit {args.limit}: must be a positive number of items")
    if args.limit is not None and not (tasks or args.task_file):
        raise AxiomError(f"--limit {args.limit}: applies to --tasks and --task-file only (--data reads --eval-tokens)")
    if args.eval_tokens is not None and not args.data:
        raise AxiomError(f"--eval-tokens {args.eval_tokens}: applies to --data only (tasks read --limit items)")
    if args.num_fewshot is not None and (args.num_fewshot < 0 or not tasks):
        raise AxiomError(
            f"--num-fewshot {args.num_fewshot}: applies to --tasks only and must be >= 0 (task files are 0-shot)"
        )
    return tasks


def run(args: argparse.Namespace) -> None:
    tasks = check_args(args)
    device = pick_device(args.device)
    manifest = read_manifest(args.data) if args.data else None  # clear errors before the model loads
    task_items = {path: read_task_file(path)[: args.limit] for path in args.task_file}
    if tasks:
        require("lm_eval", "--tasks", "axiom-lm[eval]")
        try:
            from axiom.eval.harness import check_hub, run_tasks
        except ImportError as e:
            raise AxiomError(
                f"--tasks: lm-evaluation-harness is installed but does not import as axiom needs it ({e}); it needs "
                "lm-eval 0.4.10 or later: pip install -U 'lm-eval[hf]>=0.4.10'"
            ) from None
        check_hub(tasks)  # offline: one line now, not after the model loads and the other evaluations ran
    model, cfg, meta = load_model(args.ckpt, device)
    t = cfg.train
    # every choice must fit the model before anything is scored
    requests = {
        path: choice_requests(items, cfg.model.max_seq_len, cfg.model.vocab_size) for path, items in task_items.items()
    }
    out = {"ckpt": str(args.ckpt), "step": meta.get("step"), "tokens_seen": meta.get("tokens")}
    lines = []
    if manifest is not None:
        result = val_loss(model, cfg, args, manifest)
        out |= asdict(result)
        if math.isinf(result.ppl):  # a loss past ~709.8 nats: JSON has no inf
            out["ppl"] = None
        lines.append(
            f"{args.ckpt} (step {out['step']}): val loss {result.loss:.4f}, ppl {result.ppl:.2f}, "
            f"bpb {result.bpb:.4f} over {result.tokens:,} tokens ({result.bytes:,} bytes)"
        )
    rows = []
    if task_items:
        batch_size = args.batch_size or TASK_BATCH
        out["task_files"], rows = task_file_results(model, task_items, requests, batch_size, t.dtype, not args.json)
    if tasks:
        harness = run_tasks(model, tasks, args.limit, args.num_fewshot, args.batch_size or TASK_BATCH, t.dtype)
        out["tasks"], out["n_shot"] = harness["results"], harness.get("n-shot")
        rows += harness_rows(harness)
    if args.json:
        print(json.dumps(out))
        return
    if not lines:
        lines.append(f"{args.ckpt} (step {out['step']})")
    if rows:
        lines.append(task_table(rows))
    print("\n".join(lines))


def val_loss(model: torch.nn.Module, cfg: Config, args: argparse.Namespace, manifest: dict) -> EvalResult:
    """`evaluate` on --data (`manifest`: its) with the checkpoint's sequence length and dtype; a loss that is not
    finite is an error."""
    t = cfg.train
    seq_len = cfg.eval_seq_len
    eval_tokens = args.eval_tokens if args.eval_tokens is not None else t.eval_tokens
    if eval_tokens < seq_len:
        raise AxiomError(f"--eval-tokens {eval_tokens}: less than one sequence of {seq_len} tokens")
    if masks_documents(manifest, t.doc_masking):
        model.doc_sep = EOS_ID  # as the run's own evaluation (eval.csv) saw the windows
    try:
        result = evaluate(
            model,
            args.data,
            seq_len=seq_len,
            batch_size=args.batch_size or t.micro_batch_size,
            eval_tokens=eval_tokens,
            dtype=t.dtype,
            manifest=manifest,
        )
    finally:
        model.doc_sep = None  # task items are scored unmasked, as lm-eval scores them
    if not math.isfinite(result.loss):
        raise AxiomError(
            f"{args.ckpt}: the validation loss is {result.loss} (not finite) over {result.tokens:,} tokens; the "
            "model overflows on this data (a diverged run?)"
        )
    return result


def task_file_results(
    model: torch.nn.Module,
    task_items: dict[str, list[Item]],
    requests: dict[str, list],
    batch_size: int,
    dtype: str,
    progress: bool,
) -> tuple[dict, list[tuple]]:
    """The --json entry of each task file (nan as null) and its table row; `requests`: each file's choice_requests."""
    results, rows = {}, []
    for path, items in task_items.items():
        lls = choice_loglikelihoods(model, items, batch_size, dtype, progress, requests[path])
        res = score(task_name(path), items, lls)
        results[path] = {k: None if v != v else v for k, v in asdict(res).items()}  # nan -> null
        rows.append((f"{res.name} (file)", res.n, res.acc, res.acc_stderr, res.acc_norm, res.acc_norm_stderr))
    return results, rows


def harness_rows(harness: dict) -> list[tuple]:
    """(task, n, acc, ±, acc_norm, ±, perplexity, ±) from lm-eval's results; None where a task lacks a metric."""
    rows = []
    for task, metrics in harness["results"].items():
        n = harness.get("n-samples", {}).get(task, {}).get("effective")
        values = []
        for metric in ("acc", "acc_norm", "perplexity"):
            values += [metrics.get(f"{metric},none"), metrics.get(f"{metric}_stderr,none")]
        rows.append((task, n, *values))
    return rows


def task_table(rows: list[tuple]) -> str:
    """A plain-text table of task results: acc, acc_norm (and perplexity where a task has it) with their standard
    errors; "-" where a task has no such metric (N/A: the harness had too few items for an error)."""
    with_ppl = any(len(r) > 6 and r[6] is not None for r in rows)
    header = ["task", "n", "acc", "acc_norm"] + (["perplexity"] if with_ppl else [])
    table = [header]
    for name, n, *values in rows:
        cells = [name, "-" if n is None else str(n)]
        for value, err in zip(values[::2], values[1::2], strict=True):
            cells.append(_with_error(value, err))
        table.append(cells[: len(header)] + ["-"] * (len(header) - len(cells)))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table)


def _with_error(value, err) -> str:
    if value is None:
        return "-"
    digits = 2 if abs(value) >= 100 else 4  # perplexities are large
    if isinstance(err, (int, float)) and math.isfinite(err):
        return f"{value:.{digits}f} ± {err:.{digits}f}"
    return f"{value:.{digits}f} ± N/A"
