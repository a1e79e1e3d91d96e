"""`axiom eval`: validation loss, perplexity and bits per byte of a checkpoint (`evaluate` is what training calls),
and benchmark tasks: lm-eval-harness tasks in-process (`--tasks`, axiom/harness.py) and local multiple-choice files
scored natively (`--task-file`, axiom/tasks.py); docs/evaluation.md.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes of the evaluated target tokens, counted
exactly from the tokenizer (EOS counts as 0 bytes), so it compares across tokenizers and eval sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from axiom.cli.args import add_device_argument
from axiom.data.loader import data_kind, eval_batches, read_manifest
from axiom.data.packing import chat_eval_batches
from axiom.errors import AxiomError
from axiom.model.checkpoint import load_model
from axiom.model.loss import IGNORE_INDEX
from axiom.runtime import autocast, pick_device
from axiom.text.tokenizer import load_tokenizer

TASK_BATCH = 16  # contexts per forward pass when scoring tasks


@dataclass
class EvalResult:
    loss: float  # mean cross-entropy per token, nats
    ppl: float
    bpb: float  # bits per UTF-8 byte of the target text
    tokens: int
    bytes: int


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> torch.Tensor:
    """(vocab,) UTF-8 length of every token id; special tokens (EOS included) and unused ids count 0."""
    enc = load_tokenizer()
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    lengths = np.zeros(enc.n_vocab, dtype=np.int64)
    for i in range(enc.n_vocab):
        if i in special:
            continue
        with contextlib.suppress(KeyError):
            lengths[i] = len(enc.decode_single_token_bytes(i))
    return torch.from_numpy(lengths)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data_dir: str | Path,
    seq_len: int,
    batch_size: int,
    eval_tokens: int,
    dtype: str = "float32",
) -> EvalResult:
    """Loss over the first `eval_tokens` tokens of the val split (fixed windows, the same on every call).

    On chat data (axiom.data.packing) only the trained tokens count: loss, tokens and bytes are those of the targets
    that are not -100 (assistant replies and their <|im_end|>)."""
    device = next(model.parameters()).device
    chat = data_kind(read_manifest(data_dir)) == "chat"
    lengths = token_byte_lengths()
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = nbytes = 0
    vocab_size = getattr(getattr(model, "cfg", None), "vocab_size", None)  # ids past it fail in eval_batches
    try:
        batches = chat_eval_batches if chat else eval_batches
        for x, y in batches(data_dir, seq_len, batch_size, eval_tokens, vocab_size):
            with autocast(device, dtype):
                loss = model(x.to(device), y.to(device))
            targets = y[y != IGNORE_INDEX]  # all of y for text data
            total_nats += loss.double() * targets.numel()
            tokens += targets.numel()
            nbytes += int(lengths[targets].sum())
    finally:
        model.train(was_training)
    loss = total_nats.item() / tokens
    return EvalResult(
        loss=loss,
        ppl=math.exp(min(loss, 700.0)),  # exp overflows a float past ~709
        bpb=total_nats.item() / math.log(2) / max(nbytes, 1),
        tokens=tokens,
        bytes=nbytes,
    )


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
    if args.num_fewshot is not None and (args.num_fewshot < 0 or not tasks):
        raise AxiomError(
            f"--num-fewshot {args.num_fewshot}: applies to --tasks only and must be >= 0 (task files are 0-shot)"
        )
    return tasks


def run(args: argparse.Namespace) -> None:
    from axiom.eval.tasks import choice_loglikelihoods, read_task_file, score, task_name  # here: it imports this module

    tasks = check_args(args)
    device = pick_device(args.device)
    if args.data:
        read_manifest(args.data)  # clear errors before the model loads
    task_items = {path: read_task_file(path)[: args.limit] for path in args.task_file}
    if tasks:
        try:
            from axiom.eval.harness import run_tasks
        except ImportError:
            raise AxiomError("--tasks needs lm-evaluation-harness: pip install 'axiom-lm[eval]'") from None
    model, cfg, meta = load_model(args.ckpt, device)
    t = cfg.train
    out = {"ckpt": str(args.ckpt), "step": meta.get("step"), "tokens_seen": meta.get("tokens")}
    lines = []
    if args.data:
        seq_len = min(t.seq_len, cfg.model.max_seq_len)
        eval_tokens = args.eval_tokens if args.eval_tokens is not None else t.eval_tokens
        if eval_tokens < seq_len:
            raise AxiomError(f"--eval-tokens {eval_tokens}: less than one sequence of {seq_len} tokens")
        result = evaluate(
            model,
            args.data,
            seq_len=seq_len,
            batch_size=args.batch_size or t.micro_batch_size,
            eval_tokens=eval_tokens,
            dtype=t.dtype,
        )
        if not math.isfinite(result.loss):
            raise AxiomError(
                f"{args.ckpt}: the validation loss is {result.loss} (not finite) over {result.tokens:,} tokens; the "
                "model overflows on this data (a diverged run?)"
            )
        out |= asdict(result)
        lines.append(
            f"{args.ckpt} (step {out['step']}): val loss {result.loss:.4f}, ppl {result.ppl:.2f}, "
            f"bpb {result.bpb:.4f} over {result.tokens:,} tokens ({result.bytes:,} bytes)"
        )
    rows = []
    if task_items:
        out["task_files"] = {}
        for path, items in task_items.items():
            lls = choice_loglikelihoods(model, items, args.batch_size or TASK_BATCH, t.dtype, progress=not args.json)
            res = score(task_name(path), items, lls)
            out["task_files"][path] = {k: None if v != v else v for k, v in asdict(res).items()}  # nan -> null
            rows.append((f"{res.name} (file)", res.n, res.acc, res.acc_stderr, res.acc_norm, res.acc_norm_stderr))
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
