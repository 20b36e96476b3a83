"""The objective (weighted mean), the paired bootstrap of the evolved-minus-best-source difference,
the typed comparison file and the fitness plot with its reference lines."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

import pytest

from umm.eval.stats import paired_bootstrap_difference, weighted_mean
from umm.evolve.report import (
    Comparison,
    ComparisonRow,
    Reference,
    load_references,
    objective,
    plot_fitness,
    save_references,
    write_comparison,
)
from umm.evolve.state import Candidate, Generation, SearchState


def test_objective_is_the_weighted_mean() -> None:
    assert objective({"math": 1.0, "code": 0.0}, {"math": 3.0, "code": 1.0}) == pytest.approx(0.75)
    assert objective({"math": 0.4, "code": 0.6}, {"math": 1.0, "code": 1.0}) == pytest.approx(0.5)
    # only the ratios of the weights matter
    assert objective({"a": 0.2, "b": 0.9}, {"a": 2, "b": 6}) == pytest.approx(objective({"a": 0.2, "b": 0.9}, {"a": 1, "b": 3}))
    with pytest.raises(ValueError, match="sum to more than 0"):
        weighted_mean({"a": 1.0}, {"a": 0.0})


# a hand-made pair of models: per-item correctness on the same items of two tasks
A = {"math": [1, 1, 0], "code": [1, 0]}
B = {"math": [0, 1, 0], "code": [0, 1]}
W = {"math": 2.0, "code": 1.0}


def _exact_bootstrap() -> list[tuple[Fraction, Fraction]]:
    """Every equally likely bootstrap outcome (value, probability), by enumeration (no sampling)."""
    d = {t: [Fraction(a - b) for a, b in zip(A[t], B[t])] for t in W}
    per_task = {}
    for t, dt in d.items():
        n = len(dt)
        draws = list(itertools.product(range(n), repeat=n))
        per_task[t] = [(sum(dt[i] for i in idx) / n, Fraction(1, len(draws))) for idx in draws]
    total = Fraction(int(sum(W.values())))
    out = []
    for (vm, pm), (vc, pc) in itertools.product(per_task["math"], per_task["code"]):
        out.append(((Fraction(int(W["math"])) * vm + Fraction(int(W["code"])) * vc) / total, pm * pc))
    return out


def _cdf(dist: list[tuple[Fraction, Fraction]], x: float, strict: bool = False) -> float:
    """P(D < x) or P(D <= x); ``x`` is a float, so values within 1e-9 of it count as equal."""
    return float(sum(p for v, p in dist if (v < x - 1e-9 if strict else v <= x + 1e-9)))


def test_paired_bootstrap_matches_the_exact_bootstrap_distribution() -> None:
    got = paired_bootstrap_difference(A, B, W, resamples=40000, seed=3)
    # diff = (2 * mean(1, 0, 0) + 1 * mean(1, -1)) / 3 = 2/9 = objective(A) - objective(B)
    assert got.diff == pytest.approx(2 / 9)
    mean = {m: {t: sum(v) / len(v) for t, v in x.items()} for m, x in (("a", A), ("b", B))}
    assert got.diff == pytest.approx(objective(mean["a"], W) - objective(mean["b"], W))
    # each end of the interval is the exact distribution's 2.5% / 97.5% quantile (up to Monte Carlo error)
    dist = _exact_bootstrap()
    assert sum(p for _, p in dist) == 1
    for end, q in ((got.ci_low, 0.025), (got.ci_high, 0.975)):
        assert any(abs(float(v) - end) < 1e-12 for v, _ in dist), "an interval end must be a bootstrap value"
        assert _cdf(dist, end, strict=True) <= q + 0.004 and _cdf(dist, end) >= q - 0.004
    assert got.ci_low < got.diff < got.ci_high


def test_paired_bootstrap_edge_cases() -> None:
    same = paired_bootstrap_difference(A, A, W)
    assert (same.diff, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    ones = {"math": [1, 1, 1], "code": [1, 1]}
    zeros = {"math": [0, 0, 0], "code": [0, 0]}
    assert paired_bootstrap_difference(ones, zeros, W) == paired_bootstrap_difference(ones, zeros, W, seed=9)
    assert paired_bootstrap_difference(ones, zeros, W).ci_low == pytest.approx(1.0)
    # deterministic for a seed
    assert paired_bootstrap_difference(A, B, W, seed=5) == paired_bootstrap_difference(A, B, W, seed=5)
    with pytest.raises(ValueError, match="same, non-zero number of items"):
        paired_bootstrap_difference({"math": [1, 0], "code": [1, 0]}, B, W)


def _state(fitness: list[list[float]], optimizer: str = "cma") -> SearchState:
    gens = [
        Generation(g, [Candidate(g, i, [0.0], [0.5], {"t": f}, f, 0.1) for i, f in enumerate(fs)], 0.1)
        for g, fs in enumerate(fitness)
    ]
    return SearchState(optimizer=optimizer, seed=0, dimension=1, population=2, sigma0=0.7, z0=[0.0], generations=gens)


def test_fitness_plot_with_reference_lines(tmp_path: Path) -> None:
    refs = [
        Reference(name="source: math", kind="source", scores={"t": 0.5}, objective=0.5),
        Reference(name="untuned task_arithmetic", kind="baseline", scores={"t": 0.3}, objective=0.3),
    ]
    save_references(tmp_path, refs)
    assert list(load_references(tmp_path).values()) == refs
    (tmp_path / "references.json").write_text("{not json")
    assert load_references(tmp_path) == {}  # unreadable: recomputed by the run
    png = plot_fitness(_state([[0.2], [0.3, 0.5], [0.6, 0.4]]), tmp_path / "fitness.png", references=refs,
                       random_state=_state([[0.2], [0.25, 0.1], [0.35, 0.3]], "random"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_file_is_typed(tmp_path: Path) -> None:
    rows = [
        ComparisonRow(name="evolved", kind="evolved", scores={"t": 0.6}, objective=0.6, n={"t": 200},
                      ci={"t": (0.53, 0.66)}),
        ComparisonRow(name="source: math", kind="source", scores={"t": 0.5}, objective=0.5, n={"t": 200},
                      ci={"t": (0.43, 0.57)}),
    ]
    diff = paired_bootstrap_difference({"t": [1, 1, 0]}, {"t": [1, 0, 0]}, {"t": 1.0})
    comp = Comparison(weights={"t": 1.0}, rows=rows, best_source="source: math", evolved_minus_best_source=diff,
                      resamples=2000, seed=0)
    md = write_comparison(tmp_path, comp)
    data = json.loads((tmp_path / "comparison.json").read_text())
    assert Comparison.model_validate(data) == comp
    assert set(data["evolved_minus_best_source"]) == {"diff", "ci_low", "ci_high"}
    assert [r["kind"] for r in data["rows"]] == ["evolved", "source"]
    assert "evolved - best source (source: math)" in md
    with pytest.raises(ValueError):
        ComparisonRow(name="x", kind="merged", scores={}, objective=0.0, n={}, ci={})
