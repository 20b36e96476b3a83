"""Publish only what is better: the merged model must beat the best source and the previous one.

The objective of a model is the weighted mean of its task scores (:func:`umm.evolve.report.objective`),
a task's score being the fraction of its test items answered correctly. The merged model is
published when the paired-bootstrap 95% interval (:func:`umm.evolve.run.paired_difference`, items
paired by id) of objective(merged) - objective(best source) has its lower bound above ``margin``,
and so has that of objective(merged) - objective(previous) when there is a previous model. The
best source is the source with the highest objective (ties: the name that sorts first).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from umm.errors import UmmError
from umm.eval.stats import PairedDifference
from umm.evolve.report import objective
from umm.evolve.run import paired_difference

#: per-item correctness: task -> item id -> correct
Correctness = dict[str, dict[str, bool]]


class Decision(BaseModel):
    """Whether the merged model is published, why (``text``), and the figures behind it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    published: bool
    text: str
    margin: float
    best_source: str
    diff_vs_best_source: PairedDifference
    previous: str | None = None
    diff_vs_previous: PairedDifference | None = None


def correctness_objective(correct: Correctness, weights: dict[str, float]) -> float:
    """The objective of per-item correctness: ``sum_t w_t * mean_i correct[t][i] / sum_t w_t``."""
    scores = {}
    for task in weights:
        items = correct.get(task)
        if not items:
            raise UmmError(f"task {task}: no scored test items")
        scores[task] = sum(items.values()) / len(items)
    return objective(scores, weights)


def _fmt(d: PairedDifference) -> str:
    return f"{d.diff:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]"


def decide(
    merged: Correctness,
    sources: dict[str, Correctness],
    weights: dict[str, float],
    *,
    previous: Correctness | None = None,
    previous_name: str | None = None,
    margin: float = 0.0,
) -> Decision:
    """The publication decision of ``merged`` against ``sources`` (name -> correctness) and
    ``previous`` (see the module docstring)."""
    if not sources:
        raise UmmError("no source to compare the merged model with")
    best = min(sorted(sources), key=lambda name: -correctness_objective(sources[name], weights))
    vs_best = paired_difference(merged, sources[best], weights)
    vs_prev = paired_difference(merged, previous, weights) if previous is not None else None
    prev_label = previous_name or "previous"
    beats_best = vs_best.ci_low > margin
    beats_prev = vs_prev is None or vs_prev.ci_low > margin
    figures = f"best source {best} by {_fmt(vs_best)}"
    if vs_prev is not None:
        figures += f" and previous {prev_label} by {_fmt(vs_prev)}"
    rule = f"(paired bootstrap, 95% CI; publish when each lower bound > {margin:g})"
    if beats_best and beats_prev:
        text = f"published: merged beats {figures} {rule}"
    else:
        short = [n for n, ok in ((f"best source {best}", beats_best), (f"previous {prev_label}", beats_prev)) if not ok]
        text = f"no improvement over {' and '.join(short)}: merged vs {figures} {rule}"
    return Decision(published=beats_best and beats_prev, text=text, margin=margin, best_source=best,
                    diff_vs_best_source=vs_best, previous=previous_name if previous is not None else None,
                    diff_vs_previous=vs_prev)
