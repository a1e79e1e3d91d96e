"""Evaluation shortcuts for tests: a task file scored in one call, and a task file as an inline lm-eval task."""

from __future__ import annotations

from pathlib import Path

from axiom.eval.tasks import TaskResult, choice_loglikelihoods, read_task_file, score, task_name
from axiom.model.transformer import Axiom


def evaluate_task_file(
    model: Axiom, path: str | Path, limit: int | None = None, batch_size: int = 16, dtype: str = "float32"
) -> TaskResult:
    """acc and acc_norm of `model` on the first `limit` items (all by default) of a task file."""
    items = read_task_file(path)[:limit]
    return score(task_name(path), items, choice_loglikelihoods(model, items, batch_size, dtype))


def json_task(name: str, path: str | Path, fields: tuple[str, str, str] = ("context", "choices", "answer")) -> dict:
    """An inline lm-eval task config (pass it in `tasks`) for a local multiple-choice JSONL in the generic format,
    or another whose fields are named: lm-eval's own requests and metrics on a task file (tests, the benchmark)."""
    context, choices, answer = fields
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": f"{{{{{context}}}}}",
        "doc_to_choice": f"{{{{{choices}}}}}",
        "doc_to_target": f"{{{{{answer}}}}}",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
