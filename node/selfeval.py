"""Self-reported scores: our own model on the ``test`` split of a few tasks, before announcing.

These scores are only a hint for people reading the network: the coordinator re-evaluates every
expert on its own benchmark and publishes the verified scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 50


def parse_tasks(values: Sequence[str]) -> list[str]:
    """``["gsm8k,math", "mbpp"]`` -> ``["gsm8k", "math", "mbpp"]``; unknown names raise EvalError."""
    from umm.eval import get_task

    names = [t.strip() for v in values for t in v.split(",") if t.strip()]
    for name in names:
        get_task(name)  # clear error for an unknown task, before any model is loaded
    return list(dict.fromkeys(names))


def self_evaluate(
    model_dir: Path,
    tasks: Sequence[str],
    *,
    limit: int = DEFAULT_LIMIT,
    device: str | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict[str, float]:
    """Score of ``model_dir`` per task on the ``test`` split (``limit`` items each)."""
    from umm.eval import evaluate_folder
    from umm.ui import Bars

    if not tasks:
        return {}
    result = evaluate_folder(model_dir, list(tasks), split="test", limit=limit, seed=seed, device=device,
                             on_progress=Bars() if show_progress else None)
    scores = {name: float(s.score) for name, s in result.scores.items()}
    logger.info("self-evaluation of %s: %s", model_dir, scores)
    return scores
