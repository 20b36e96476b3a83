"""``plan_combine``: which models are fused into the pivot and which are merged onto which base."""

from __future__ import annotations

import pytest

from umm.combine.plan import ModelInfo, PlanError, plan_combine

LLAMA = ("arch-llama", "tok-bytelevel")
NEOX = ("arch-neox", "tok-metaspace")


def info(path: str, family: tuple[str, str] = LLAMA) -> ModelInfo:
    return ModelInfo(path=path, name=path.rsplit("/", 1)[-1], architecture=family[0], tokenizer=family[1])


def test_one_family_is_evolve_alone_onto_the_base() -> None:
    plan = plan_combine([info("/m/math"), info("/m/code")], "/m/math", info("/m/base"), None)
    assert plan.stages == ["evolve"] and plan.fuse == []
    assert plan.base == "/m/base" and plan.family == ["/m/math", "/m/code"]


def test_two_families_fuse_the_other_familys_sources_into_the_pivot() -> None:
    models = [info("/m/math"), info("/m/code"), info("/m/list", NEOX), info("/m/poem", NEOX)]
    plan = plan_combine(models, "/m/code", info("/m/base"), None)
    assert plan.stages == ["fuse", "evolve"]
    assert plan.pivot == "/m/code" and plan.fuse == ["/m/list", "/m/poem"]
    assert plan.family == ["/m/math", "/m/code"] and plan.base == "/m/base"


def test_the_pivot_of_the_other_family_fuses_the_first_family() -> None:
    models = [info("/m/math"), info("/m/code"), info("/m/list", NEOX)]
    plan = plan_combine(models, "/m/list", info("/m/base"), None)
    # the base is a Llama: not of the pivot's family, so the pivot is the base and merges nothing itself
    assert plan.base == "/m/list" and plan.family == [] and plan.fuse == ["/m/math", "/m/code"]


def test_a_base_of_another_family_or_none_makes_the_pivot_the_base() -> None:
    models = [info("/m/math"), info("/m/code"), info("/m/list", NEOX)]
    for base in (info("/m/neox-base", NEOX), None):
        plan = plan_combine(models, "/m/math", base, None)
        assert plan.base == "/m/math" and plan.family == ["/m/code"] and plan.fuse == ["/m/list"]


def test_previous_joins_the_merge_only_when_it_is_of_the_pivots_family() -> None:
    models = [info("/m/math"), info("/m/code"), info("/m/list", NEOX)]
    plan = plan_combine(models, "/m/math", info("/m/base"), info("/runs/r1/model"))
    assert plan.family == ["/m/math", "/m/code", "/runs/r1/model"]
    plan = plan_combine(models, "/m/math", info("/m/base"), info("/runs/r1/model", NEOX))
    assert plan.family == ["/m/math", "/m/code"] and plan.fuse == ["/m/list"]


def test_a_family_of_one_and_nothing_to_fuse_is_refused() -> None:
    with pytest.raises(PlanError, match="nothing to merge"):  # a single model onto its base
        plan_combine([info("/m/math")], "/m/math", info("/m/base"), None)
    with pytest.raises(PlanError, match="nothing to merge"):
        plan_combine([info("/m/math")], "/m/math", None, None)
    with pytest.raises(PlanError, match="not one of the models"):
        plan_combine([info("/m/math"), info("/m/code")], "/m/list", None, None)
    # pivot alone in its family but a source of another family: fusing it is the merge
    plan = plan_combine([info("/m/math"), info("/m/list", NEOX)], "/m/math", None, None)
    assert plan.family == [] and plan.fuse == ["/m/list"] and plan.base == "/m/math"
