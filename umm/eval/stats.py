"""Scores and their uncertainty: Wilson and bootstrap 95% intervals, unbiased pass@k, the weighted
mean objective and the paired bootstrap of a difference of objectives."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``correct / n`` (``(0, 1)`` when ``n == 0``)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= correct <= n:
        raise ValueError(f"correct must be in [0, {n}], got {correct}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


def bootstrap_interval(
    values: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (deterministic for a seed)."""
    n = len(values)
    if n == 0:
        return 0.0, 1.0
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c,k)/C(n,k)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"need 0 <= c <= n and k >= 1, got n={n} c={c} k={k}")
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def weighted_mean(values: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """``sum_t w_t * values[t] / sum_t w_t`` over the keys of ``weights`` (the multi-task objective).

    Raises ``ValueError`` when the weights sum to 0 or less (nothing to average).
    """
    total = float(sum(weights.values()))
    if not total > 0:
        raise ValueError(f"the weights must sum to more than 0, got {dict(weights)}")
    return float(sum(w * values[t] for t, w in weights.items()) / total)


@dataclass(frozen=True)
class PairedDifference:
    """A difference of two models' objectives and its percentile-bootstrap interval."""

    diff: float
    ci_low: float
    ci_high: float


def paired_bootstrap_difference(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    weights: Mapping[str, float],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Paired bootstrap of the difference of weighted-mean objectives of models ``a`` and ``b``.

    ``a[t][i]`` and ``b[t][i]`` are the per-item scores (1/0 correctness) of the two models on the
    *same* item ``i`` of task ``t`` (``n_t`` items). With ``W = sum_t w_t``:

        diff = sum_t w_t * mean_i (a[t][i] - b[t][i]) / W        (= objective(a) - objective(b))

    Each of ``resamples`` replicates draws ``n_t`` item indices with replacement *within each task*
    (one ``numpy.random.default_rng(seed)`` stream, tasks in ``weights`` order), keeps the pairs
    together, and recomputes the same formula on the drawn items; the interval is the
    ``(1 - level)/2`` and ``(1 + level)/2`` order statistics of the sorted replicates (indices
    ``int(q * resamples)``, as :func:`bootstrap_interval`). Deterministic for a seed.
    """
    import numpy as np

    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    total = float(sum(weights.values()))
    if not total > 0:
        raise ValueError(f"the weights must sum to more than 0, got {dict(weights)}")
    rng = np.random.default_rng(seed)
    diff = 0.0
    replicates = np.zeros(resamples)
    for task, w in weights.items():
        if len(a[task]) != len(b[task]) or not a[task]:
            raise ValueError(f"task {task}: the paired scores need the same, non-zero number of items "
                             f"(got {len(a[task])} and {len(b[task])})")
        d = np.asarray(a[task], dtype=np.float64) - np.asarray(b[task], dtype=np.float64)
        diff += w * float(d.mean())
        idx = rng.integers(0, d.size, size=(resamples, d.size))
        replicates += w * d[idx].mean(axis=1)
    replicates = np.sort(replicates / total)
    lo = float(replicates[int((1 - level) / 2 * resamples)])
    hi = float(replicates[min(resamples - 1, int((1 + level) / 2 * resamples))])
    return PairedDifference(diff / total, lo, hi)
