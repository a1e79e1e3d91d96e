"""Evaluation shortcuts for tests: a task file scored in one call."""

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
