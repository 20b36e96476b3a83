"""Tasks by name: the registry, and the task API in one place.

A task is data + prompt + generation settings + answer extraction + scorer; its base types are
defined in :mod:`umm.eval.tasks.base` and re-exported here. The dependency runs one way: this
module imports the built-in task modules (each has a ``TASKS`` table, name -> factory), and they
import only the base types.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from umm.eval.tasks import gsm8k, humaneval, math, mbpp, synthetic
from umm.eval.tasks.base import (
    AnswerTask,
    CodeTask,
    EvalError,
    EvalSplit,
    Sample,
    Task,
    read_jsonl,
    stable_id,
)

__all__ = [
    "AnswerTask",
    "CodeTask",
    "EvalError",
    "EvalSplit",
    "Sample",
    "Task",
    "get_task",
    "list_tasks",
    "read_jsonl",
    "register_task",
    "resolve_tasks",
    "stable_id",
]

_REGISTERED: dict[str, Callable[[Path | None], Task]] = {
    name: factory for module in (gsm8k, math, humaneval, mbpp, synthetic) for name, factory in module.TASKS.items()
}


def register_task(name: str, factory: Callable[[Path | None], Task]) -> None:
    """Add a task factory (``factory(data_path_or_None) -> Task``) under ``name`` (it takes the
    place of a task of the same name)."""
    _REGISTERED[name] = factory


def list_tasks() -> list[str]:
    """Names of every registered task."""
    return sorted(_REGISTERED)


def get_task(name: str, data: Path | None = None) -> Task:
    """The task called ``name`` (optionally reading its items from ``data``, a JSONL file)."""
    if name not in _REGISTERED:
        raise EvalError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(_REGISTERED))}")
    return _REGISTERED[name](Path(data) if data is not None else None)


def resolve_tasks(tasks: Iterable[Task | str], data: Path | None = None) -> list[Task]:
    return [t if isinstance(t, Task) else get_task(t, data) for t in tasks]
