"""``decide``: publish only when the CI lower bounds of merged - best source and merged - previous
exceed the margin. The cases are built so that the figures follow by hand: where every item of a
task has the same difference, every bootstrap replicate equals the difference itself."""

from __future__ import annotations

import pytest

from umm.combine.decision import decide


def items(*values: int, prefix: str = "i") -> dict[str, bool]:
    return {f"{prefix}{k}": bool(v) for k, v in enumerate(values)}


WEIGHTS = {"a": 1.0, "b": 3.0}
# merged: a all right (1.0), b half right (0.5) -> objective (1 * 1.0 + 3 * 0.5) / 4 = 0.625
MERGED = {"a": items(1, 1, 1, 1), "b": items(1, 1, 0, 0)}
# x: a all wrong (0), b as merged (0.5) -> 0.375; y: a half (0.5), b all wrong (0) -> 0.125
X = {"a": items(0, 0, 0, 0), "b": items(1, 1, 0, 0)}
Y = {"a": items(1, 1, 0, 0), "b": items(0, 0, 0, 0)}


def test_merged_beating_the_best_source_everywhere_is_published() -> None:
    d = decide(MERGED, {"x": X, "y": Y}, WEIGHTS)
    # best source x (0.375 > 0.125); merged - x: task a +1 on every item, task b 0 on every item
    # -> diff = (1 * 1 + 3 * 0) / 4 = 0.25 in every replicate
    assert d.best_source == "x"
    assert d.diff_vs_best_source.diff == pytest.approx(0.25)
    assert d.diff_vs_best_source.ci_low == pytest.approx(0.25) and d.diff_vs_best_source.ci_high == pytest.approx(0.25)
    assert d.published and d.text.startswith("published") and "x" in d.text and "+0.250" in d.text
    assert d.previous is None and d.diff_vs_previous is None


def test_a_gain_below_the_margin_is_not_published() -> None:
    d = decide(MERGED, {"x": X, "y": Y}, WEIGHTS, margin=0.3)
    assert not d.published and d.margin == 0.3
    assert d.text.startswith("no improvement over best source x")
    assert decide(MERGED, {"x": X, "y": Y}, WEIGHTS, margin=0.2).published


def test_a_noisy_gain_whose_interval_touches_zero_is_not_published() -> None:
    # 20 items, merged right on one more item than the source: diff = 1/20; every item difference
    # is >= 0, and a replicate that misses that item (probability (19/20)^20 = 0.36) is 0, so the
    # 2.5% quantile is exactly 0: not above a margin of 0.
    source = {"a": items(*([0] * 20))}
    merged = {"a": items(1, *([0] * 19))}
    d = decide(merged, {"s": source}, {"a": 1.0})
    assert d.diff_vs_best_source.diff == pytest.approx(0.05)
    assert d.diff_vs_best_source.ci_low == 0.0 and d.diff_vs_best_source.ci_high > 0.05
    assert not d.published


def test_beating_the_best_source_but_not_the_previous_model_is_not_published() -> None:
    previous = {"a": items(1, 1, 1, 1), "b": items(1, 1, 0, 0)}  # the same answers as merged: diff 0
    d = decide(MERGED, {"x": X, "y": Y}, WEIGHTS, previous=previous, previous_name="round 1")
    assert d.diff_vs_best_source.ci_low == pytest.approx(0.25)
    assert d.previous == "round 1"
    assert d.diff_vs_previous is not None and d.diff_vs_previous.diff == 0 and d.diff_vs_previous.ci_low == 0
    assert not d.published and d.text.startswith("no improvement over previous round 1")
    worse = {"a": items(0, 0, 0, 0), "b": items(0, 0, 0, 0)}  # merged - worse = 0.625 everywhere
    d = decide(MERGED, {"x": X, "y": Y}, WEIGHTS, previous=worse, previous_name="round 1")
    assert d.published and d.diff_vs_previous.diff == pytest.approx(0.625) and "round 1" in d.text


def test_items_must_be_the_same_in_both_models() -> None:
    other = {"a": items(1, 1, 1, 1, prefix="j"), "b": items(1, 1, 0, 0)}
    with pytest.raises(RuntimeError, match="different test items"):
        decide(MERGED, {"x": other}, WEIGHTS)
