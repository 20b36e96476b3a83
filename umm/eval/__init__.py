"""Evaluation: tasks (data + prompt + generation settings + answer extraction + scorer),
batched generation, sandboxed code execution and scores with confidence intervals.

Public API::

    get_task(name, data=None) -> Task          list_tasks() -> list[str]
    evaluate(model, tokenizer, tasks, *, split="search", limit=None, seed=0, batch_size=16, ...)
    evaluate_folder(path, tasks, *, split="test", device=None, dtype=None, ...) -> EvalResult
    score_completions(task, completions) -> EvalResult
"""

from umm.eval.evaluate import EvalResult, SampleRecord, TaskScore, evaluate, evaluate_folder, score_completions
from umm.eval.task import EvalError, Sample, Task, get_task, list_tasks, register_task

__all__ = [
    "EvalError",
    "EvalResult",
    "Sample",
    "SampleRecord",
    "Task",
    "TaskScore",
    "evaluate",
    "evaluate_folder",
    "get_task",
    "list_tasks",
    "register_task",
    "score_completions",
]
