"""Multiple-choice evaluation from local JSONL files, scored natively: acc and acc_norm as lm-eval-harness defines them.

An item is a context and its choices; each choice is scored by the summed log-likelihood of `" " + choice` given the
context (lm-eval's default target delimiter). acc takes the choice with the highest sum; acc_norm divides each sum
by the choice's length in characters first (lm-eval's `acc_norm`, not a per-token mean). Both pick the first of
equal maxima, as numpy's argmax does in lm-eval.

Text is split into context and continuation tokens exactly as lm-eval's `TemplateLM` does for a causal model:
whitespace at the end of the context moves to the continuation, the continuation's tokens are those of
context + continuation after the context's own tokens, an empty context becomes EOS (Axiom has no BOS), and a
sequence longer than the model's context loses tokens on the left. A continuation longer than the model's context
cannot be scored (lm-eval asserts); it is an AxiomError naming the item.

`loglikelihoods` is the scorer that both `axiom eval --task-file` and the lm-eval adapter (axiom/eval/harness.py)
use. Requests with the same context tokens share one pass over the context: it is run once into a KV cache, which
each continuation then extends, and only the positions that predict continuation tokens reach the output layer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from axiom.errors import AxiomError
from axiom.files import describe_missing
from axiom.model.cache import KVCache
from axiom.model.loss import output_logits
from axiom.model.transformer import Axiom
from axiom.runtime import autocast
from axiom.text.tokenizer import EOS_ID, load_tokenizer, outside_vocabulary

FORMATS = '{"context", "choices", "answer"} or HellaSwag\'s {"ctx", "endings", "label"}'
HELLASWAG_RAW = ("activity_label", "ctx_a", "ctx_b")  # the original release, as llm.c downloads it
TASK_BATCH = 16  # contexts per forward pass when scoring tasks, by default
LOGIT_ROWS = 256  # output-layer rows per chunk: bounds the (rows, vocab) float32 block to ~100 MB for cl100k


@dataclass
class Item:
    context: str
    choices: list[str]
    label: int
    where: str = ""  # FILE:LINE of a task file's item, for error messages


@dataclass
class TaskResult:
    name: str
    n: int
    acc: float
    acc_stderr: float  # nan for a single item (lm-eval prints N/A)
    acc_norm: float
    acc_norm_stderr: float


# ---- task files


def read_task_file(path: str | Path) -> list[Item]:
    """The items of a multiple-choice JSONL file, one JSON object per line (blank lines skipped).

    A line is `{"context", "choices", "answer"}` or HellaSwag's `{"ctx", "endings", "label"}`. A HellaSwag line that
    also has activity_label, ctx_a and ctx_b (the original release) is rendered as lm-eval's `hellaswag` task does,
    so such a file gives that task's 0-shot numbers."""
    path = Path(path)
    if not path.is_file():
        raise AxiomError(f"--task-file {path}: {describe_missing(path)}; a task file is a JSONL file, one item a line")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # JSON strings may hold U+2028 etc., splitlines' breaks
    except UnicodeDecodeError as e:
        raise AxiomError(f"--task-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    items = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            items.append(parse_item(line, f"{path}:{number}"))
    if not items:
        raise AxiomError(f"--task-file {path}: no items; each line needs {FORMATS}")
    return items


def parse_item(line: str, where: str) -> Item:
    """One JSONL line as an Item; `where` (FILE:LINE) starts every error message."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise AxiomError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # a number past int()'s 4,300 digits, nesting past the parser's depth
        raise AxiomError(f"{where}: not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(row, dict):
        raise AxiomError(f"{where}: expected a JSON object with {FORMATS}")
    hellaswag = "ctx" in row or "endings" in row
    keys = ("ctx", "endings", "label") if hellaswag else ("context", "choices", "answer")
    for key in keys:
        if key not in row:
            raise AxiomError(f"{where}: missing field {key!r}; each line needs {FORMATS}")
    context, choices, label = (row[k] for k in keys)
    if not isinstance(context, str):
        raise AxiomError(f"{where}: field {keys[0]!r} must be a string")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise AxiomError(f"{where}: field {keys[1]!r} must be a list of at least two non-empty strings")
    if isinstance(label, str) and label.isascii() and label.isdigit():  # Hugging Face's HellaSwag stores "0".."3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int):
        raise AxiomError(f"{where}: field {keys[2]!r} must be an integer index into {keys[1]!r}")
    if not 0 <= label < len(choices):
        raise AxiomError(f"{where}: field {keys[2]!r} is {label}, out of range for {len(choices)} {keys[1]!r}")
    if hellaswag and all(isinstance(row.get(k), str) for k in HELLASWAG_RAW):
        context = _hellaswag_text(row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize())
        choices = [_hellaswag_text(c) for c in choices]
        if empty := [i for i, c in enumerate(choices) if not c]:
            raise AxiomError(f"{where}: ending {empty[0]} is empty once its bracketed WikiHow markup is removed")
    return Item(context, choices, label, where)


def _hellaswag_text(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow's bracketed artifacts removed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


# ---- tokenization (lm-eval's TemplateLM.loglikelihood and _encode_pair)


def encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-eval splits them for a causal model."""
    enc = load_tokenizer()
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:  # empty, or whitespace only (lm-eval would then have no context token at all)
        cont = enc.encode_ordinary(continuation)
        return ([EOS_ID], cont) if cont[0] != EOS_ID else (cont[:1], cont[1:])
    whole = enc.encode_ordinary(context + continuation)
    ctx = enc.encode_ordinary(context)
    return ctx, whole[len(ctx) :]


# ---- scoring


@dataclass
class _Group:
    """Requests whose (left-truncated) contexts are the same tokens: one pass over `prefix` serves them all."""

    prefix: list[int]
    requests: list[int]  # indices into the request list
    continuations: list[list[int]]

    @property
    def suffix_len(self) -> int:
        return max(len(c) for c in self.continuations) - 1  # the last continuation token is only a target


def misfit(context: list[int], continuation: list[int], max_len: int, vocab_size: int) -> str | None:
    """Why a model with this context length and vocabulary cannot score a request, in words; None if it can."""
    if len(continuation) > max_len:
        return (
            f"the continuation is {len(continuation)} tokens, more than the model's context of {max_len} (only a "
            "context is cut to fit, on the left); shorten it or leave the item out"
        )
    return outside_vocabulary([*context, *continuation], vocab_size)


def _groups(requests: Sequence[tuple[list[int], list[int]]], max_len: int, vocab_size: int) -> list[_Group]:
    groups: dict[tuple[int, ...], _Group] = {}
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {i}: context and continuation need at least one token each")
        if problem := misfit(context, continuation, max_len, vocab_size):
            raise AxiomError(f"loglikelihood request {i + 1} of {len(requests)}: {problem}")
        # lm-eval feeds (context + continuation)[-(max_len + 1):][:-1]: the context loses tokens on the left
        prefix = context[-(max_len + 1 - len(continuation)) :]
        group = groups.setdefault(tuple(prefix), _Group(prefix, [], []))
        group.requests.append(i)
        group.continuations.append(continuation)
    return list(groups.values())


def _batches(groups: list[_Group], batch_size: int, max_len: int) -> list[list[_Group]]:
    """Groups in batches of at most `batch_size`, longest context first (less padding), such that the longest
    context plus the longest continuation of a batch fit the model (contexts are right-padded to one length)."""
    batches: list[list[_Group]] = []
    for g in sorted(groups, key=lambda g: -len(g.prefix)):
        last = batches[-1] if batches else None
        if (
            last is not None
            and len(last) < batch_size
            and len(last[0].prefix) + max(g.suffix_len, *(h.suffix_len for h in last)) <= max_len
        ):
            last.append(g)
        else:
            batches.append([g])
    return batches


@torch.no_grad()
def loglikelihoods(
    model: Axiom,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = TASK_BATCH,
    dtype: str = "float32",
    progress: bool = False,
    greedy: bool = True,
) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the continuation given the context,
    and whether greedy decoding would produce it (lm-eval's `loglikelihood` answer; always False when `greedy` is
    off, which saves the argmax over the vocabulary). `batch_size` counts distinct contexts per forward pass; `dtype`
    is the autocast dtype on CUDA (the CPU runs in the model's dtype); `progress` shows a bar over the batches."""
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    was_training = model.training
    model.eval()
    try:
        batches = _batches(_groups(requests, max_len, model.cfg.vocab_size), batch_size, max_len)
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress, leave=False):
            with autocast(device, dtype):
                hidden, rows, targets, spans = _batch_hidden(model, batch, device)
            logp, hits = _target_logprobs(hidden, model.lm_head.weight, rows, targets, greedy)
            for index, (start, end) in spans.items():
                out[index] = (float(logp[start:end].sum()), bool(hits[start:end].all()))
    finally:
        model.train(was_training)
    return out


def _batch_hidden(model: Axiom, batch: list[_Group], device) -> tuple[Tensor, Tensor, Tensor, dict]:
    """The final hidden states that predict continuation tokens (N, d); for every continuation token its row in
    them (M,) and the token itself (M,); and each request's (start, end) range of those M tokens.

    Pass 1 runs the contexts, right-padded to one length, into a KV cache, whose rows are then cut back to each
    context's own length (slots past a row's fill level are always masked); the context's last position predicts
    the first token of every continuation of it (one row, shared). Pass 2 copies each context's cache row once per
    continuation and runs the continuations without their last token, right-padded (causal attention never looks
    at the padding), each row from its own context's end."""
    P = max(len(g.prefix) for g in batch)
    S = max(g.suffix_len for g in batch)
    prefixes = torch.tensor([g.prefix + [0] * (P - len(g.prefix)) for g in batch], device=device)  # (B, P)
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(model.cfg, len(batch), P + S, device, dtype)
    states = model.hidden_states(prefixes, cache)  # (B, P, d)
    ends = torch.tensor([len(g.prefix) - 1 for g in batch], device=device)
    hidden = [states[torch.arange(len(batch), device=device), ends]]  # (B, d)
    cache.lengths = [len(g.prefix) for g in batch]

    requests = [(b, i, c) for b, g in enumerate(batch) for i, c in zip(g.requests, g.continuations, strict=True)]
    if S > 0:
        owner = torch.tensor([b for b, _, _ in requests], device=device)
        lengths = [cache.lengths[b] for b, _, _ in requests]
        cache = KVCache([k[owner] for k in cache.keys], [v[owner] for v in cache.values], lengths)
        suffixes = torch.tensor([c[:-1] + [0] * (S + 1 - len(c)) for _, _, c in requests], device=device)  # (R, S)
        after = model.hidden_states(suffixes, cache)  # (R, S, d)

    rows, targets, spans = [], [], {}
    n = len(batch)
    for r, (b, index, cont) in enumerate(requests):
        if len(cont) > 1:
            hidden.append(after[r, : len(cont) - 1])
        rows += [b, *range(n, n + len(cont) - 1)]
        n += len(cont) - 1
        spans[index] = (len(targets), len(targets) + len(cont))
        targets += cont
    return torch.cat(hidden), torch.tensor(rows, device=device), torch.tensor(targets, device=device), spans


def _target_logprobs(
    hidden: Tensor, weight: Tensor, rows: Tensor, targets: Tensor, greedy: bool
) -> tuple[Tensor, Tensor]:
    """(M,) float64 log-probabilities of `targets` at their `rows` of `hidden` (N, d), and (M,) whether each is the
    argmax there (all False without `greedy`). The (N, V) logits are made LOGIT_ROWS rows at a time, in float32."""
    logp = torch.empty(len(targets), dtype=torch.float64, device=hidden.device)
    hits = torch.zeros(len(targets), dtype=torch.bool, device=hidden.device)
    for s in range(0, len(hidden), LOGIT_ROWS):
        logits = output_logits(hidden[s : s + LOGIT_ROWS], weight).float()  # (n, V)
        sel = ((rows >= s) & (rows < s + LOGIT_ROWS)).nonzero()[:, 0]  # the targets scored in this block
        r, t = rows[sel] - s, targets[sel]
        logp[sel] = (logits[r, t] - torch.logsumexp(logits, dim=-1)[r]).double()
        if greedy:
            hits[sel] = logits.argmax(dim=-1)[r] == t
    return logp.cpu(), hits.cpu()


def choice_requests(items: Sequence[Item], max_len: int, vocab_size: int) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) of `" " + choice` after its context, for every choice of every item in order.
    A choice that a model with this context length and vocabulary cannot score is an AxiomError naming its item."""
    requests = []
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            context, continuation = encode_pair(item.context, " " + choice)
            if problem := misfit(context, continuation, max_len, vocab_size):
                raise AxiomError(f"{item.where or f'item {i + 1}'}: choice {j}: {problem}")
            requests.append((context, continuation))
    return requests


def choice_loglikelihoods(
    model: Axiom,
    items: Sequence[Item],
    batch_size: int = TASK_BATCH,
    dtype: str = "float32",
    progress: bool = False,
    requests: list[tuple[list[int], list[int]]] | None = None,
) -> list[list[float]]:
    """Per item, the log-likelihood of `" " + choice` given its context, for each choice. `requests`: the items'
    `choice_requests`, when the caller has made them already (to fail before any scoring)."""
    if requests is None:
        requests = choice_requests(items, model.cfg.max_seq_len, model.cfg.vocab_size)
    flat = iter(ll for ll, _ in loglikelihoods(model, requests, batch_size, dtype, progress, greedy=False))
    return [[next(flat) for _ in item.choices] for item in items]


def first_argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mean_and_stderr(xs: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error with the sample (n - 1) deviation, lm-eval's `mean_stderr`; nan for n = 1."""
    n = len(xs)
    mu = sum(xs) / n
    if n < 2:
        return mu, math.nan
    return mu, math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) / math.sqrt(n)


def score(name: str, items: Sequence[Item], lls: Sequence[Sequence[float]]) -> TaskResult:
    """acc and acc_norm (log-likelihood over the choice's characters) with their standard errors."""
    acc = [float(first_argmax(ll) == item.label) for item, ll in zip(items, lls, strict=True)]
    norm = [
        float(first_argmax([x / len(c) for x, c in zip(ll, item.choices, strict=True)]) == item.label)
        for item, ll in zip(items, lls, strict=True)
    ]
    return TaskResult(name, len(items), *mean_and_stderr(acc), *mean_and_stderr(norm))


def task_name(path: str | Path) -> str:
    """A task file's name in tables and eval.csv columns: its stem, with anything but letters, digits and _ as _."""
    return re.sub(r"\W+", "_", Path(path).stem)


# ---- evaluation during training (TrainConfig.eval_tasks)


def load_tasks(paths: Sequence[str]) -> dict[str, list[Item]]:
    """Task name -> items for each file, read once when training starts (so a bad file fails before step 1)."""
    tasks: dict[str, list[Item]] = {}
    for path in paths:
        name = task_name(path)
        if name in tasks:
            raise AxiomError(f"eval_tasks: two task files are both named {name!r} in eval.csv; rename one")
        tasks[name] = read_task_file(path)
    return tasks


def task_columns(tasks: dict[str, list[Item]]) -> tuple[str, ...]:
    """The eval.csv columns of `tasks`: NAME_acc and NAME_acc_norm per task."""
    return tuple(f"{name}_{metric}" for name in tasks for metric in ("acc", "acc_norm"))


def evaluate_tasks(model: Axiom, tasks: dict[str, list[Item]], dtype: str = "float32") -> dict[str, float]:
    """eval.csv column -> value for `tasks` (see task_columns)."""
    row = {}
    for name, items in tasks.items():
        result = score(name, items, choice_loglikelihoods(model, items, dtype=dtype))
        row |= {f"{name}_acc": result.acc, f"{name}_acc_norm": result.acc_norm}
    return row
