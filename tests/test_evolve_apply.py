"""In-memory candidates: applying a recipe to a live model gives the streamed merge's tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def _recipe(method: str, models: dict[str, Path], params: dict, per_model: list[dict] | None = None):
    from umm.merge import MergeRecipe

    per_model = per_model or [{"weight": 0.7}, {"weight": 0.4}]
    return MergeRecipe.from_dict(
        {
            "merge_method": method,
            "base_model": None if method == "linear" else str(models["base"]),
            "models": [
                {"model": str(models["math"]), "parameters": per_model[0]},
                {"model": str(models["code"]), "parameters": per_model[1]},
            ],
            "parameters": params,
            "dtype": "float32",
        }
    )


@pytest.fixture(scope="module")
def live(tiny_models: dict[str, Path]):
    from umm.checkpoints.loading import load_causal_lm
    from umm.evolve.apply import LiveMerge

    model = load_causal_lm(tiny_models["base"], device="cpu", dtype="float32")
    return LiveMerge(_recipe("task_arithmetic", tiny_models, {}), model, device="cpu")


CASES = [
    ("task_arithmetic", {}, None),
    ("task_arithmetic", {"normalize": True, "lambda": 0.8}, [{"weight": [0.1, 0.9]}, {"weight": 0.5}]),
    ("linear", {}, [{"weight": 0.2}, {"weight": 0.5}]),
    ("ties", {}, [{"weight": 0.6, "density": 0.5}, {"weight": [1.0, 0.2], "density": 0.3}]),
    ("dare_ties", {}, [{"weight": 0.6, "density": 0.5}, {"weight": 0.5, "density": 0.7}]),
]


@pytest.mark.parametrize("method,params,per_model", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_apply_in_memory_equals_the_streamed_merge(live, tiny_models, method, params, per_model) -> None:
    from umm.merge.run import merge_state_dict

    recipe = _recipe(method, tiny_models, params, per_model)
    expected = merge_state_dict(recipe)
    seconds = live.apply(recipe)
    assert seconds >= 0
    got = dict(live.model.named_parameters())
    assert set(got) <= set(expected)
    for name, p in got.items():
        torch.testing.assert_close(p.detach(), expected[name].float(), rtol=1e-5, atol=1e-6, msg=name)
    # applying another candidate really changes the live weights, and the first comes back exactly
    before = {n: p.detach().clone() for n, p in got.items()}
    live.apply(_recipe("task_arithmetic", tiny_models, {}, [{"weight": 0.0}, {"weight": 0.0}]))
    assert any(not torch.equal(before[n], p) for n, p in live.model.named_parameters())
    live.apply(recipe)
    for n, p in live.model.named_parameters():
        assert torch.equal(before[n], p.detach()), n


def test_zero_weights_give_the_base_and_load_source(live, tiny_models) -> None:
    from umm.checkpoints.reader import Checkpoint

    assert live.delta_mode  # a task-arithmetic search caches base + task vectors
    live.apply(_recipe("task_arithmetic", tiny_models, {}, [{"weight": 0.0}, {"weight": 0.0}]))
    with Checkpoint.open(tiny_models["base"]) as base:
        for n, p in live.model.named_parameters():
            torch.testing.assert_close(p.detach(), base.get_tensor(n).float(), rtol=0, atol=1e-7)
    live.load_source(live.model_paths.index(str(tiny_models["code"])))
    with Checkpoint.open(tiny_models["code"]) as code:
        for n, p in live.model.named_parameters():  # cached as base + delta: one float32 rounding
            torch.testing.assert_close(p.detach(), code.get_tensor(n).float(), rtol=1e-6, atol=1e-8)


def test_recipe_with_other_models_is_refused(live, tiny_models, tmp_path) -> None:
    from umm.evolve.apply import LiveMergeError

    other = tmp_path / "other"
    shutil.copytree(tiny_models["code"], other)
    recipe = _recipe("task_arithmetic", {**tiny_models, "code": other}, {})
    with pytest.raises(LiveMergeError, match="differ"):
        live.apply(recipe)


def test_incompatible_models_name_the_tensor_and_point_to_fuse(tiny_models, tmp_path) -> None:
    from umm.checkpoints.errors import IncompatibleCheckpointsError
    from umm.checkpoints.loading import load_causal_lm
    from umm.evolve.apply import LiveMerge
    from umm.experts.random_models import make_random_llama

    wide = make_random_llama(tmp_path / "wide", seed=5, hidden_size=32)
    model = load_causal_lm(tiny_models["base"], device="cpu", dtype="float32")
    with pytest.raises(IncompatibleCheckpointsError) as e:
        LiveMerge(_recipe("task_arithmetic", {**tiny_models, "code": wide}, {}), model)
    assert "fuse" in str(e.value)


def test_ties_search_caches_task_vectors_and_ranks(tiny_models, monkeypatch) -> None:
    """A TIES search caches task vectors and |delta| ranks; candidates equal the streamed merge
    exactly, whatever the densities (all, none, some), rescale or the weights, also merged in
    many small blocks of rows."""
    from umm.checkpoints.loading import load_causal_lm
    from umm.evolve import apply
    from umm.evolve.apply import LiveMerge
    from umm.merge.run import merge_state_dict

    monkeypatch.setattr(apply, "RANKED_BLOCK", 50)  # several blocks per tensor, odd row counts

    ties = _recipe("ties", tiny_models, {}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.8}])
    live = LiveMerge(ties, load_causal_lm(tiny_models["base"], device="cpu", dtype="float32"))
    assert live.delta_mode
    assert len(live._ranks) == len(live.tensor_names) * 2  # one rank per tensor and expert
    recipes = [
        ties,
        _recipe("ties", tiny_models, {"rescale": True, "lambda": 1.4},
                [{"weight": [1.7, 0.1], "density": [0.05, 0.9]}, {"weight": 0.3, "density": 1.0}]),
        _recipe("ties", tiny_models, {"normalize": False}, [{"weight": 1.2, "density": 0.0}, {"weight": 0.8, "density": 0.5}]),
        _recipe("task_arithmetic", tiny_models, {"lambda": 1.3}),
    ]
    for recipe in recipes:
        expected = merge_state_dict(recipe)
        live.apply(recipe)
        for name, p in live.model.named_parameters():
            if recipe.merge_method == "ties":
                assert torch.equal(p.detach(), expected[name].float()), name
            else:
                torch.testing.assert_close(p.detach(), expected[name].float(), rtol=1e-5, atol=1e-6, msg=name)


def test_ranked_top_k_equals_magnitude_with_ties_in_magnitude() -> None:
    """Equal magnitudes (here: many zeros and repeated values, both signs) are kept lower flat
    index first, as the whole-tensor magnitude sparsification does; rescale too."""
    from umm.evolve.apply import RankedTopK, descending_rank
    from umm.merge.methods import sparsify

    g = torch.Generator().manual_seed(0)
    d = torch.randint(-3, 4, (37, 29), generator=g).float() * 0.25
    rank = descending_rank(d)
    for density in (0.0, 0.01, 0.3, 0.5, 0.77, 0.999, 1.0):
        for rescale in (False, True):
            got = RankedTopK(rank, density, rescale).apply(d.clone(), 0)
            want = sparsify.magnitude(d.clone(), density, rescale)
            assert torch.equal(got, want), (density, rescale)
            assert torch.equal(got.signbit(), want.signbit()), (density, rescale)


def test_raw_cache_mode_matches_too(tiny_models) -> None:
    """A search over a random method (DARE-TIES) caches the sources as they are (no task
    vectors); both paths still agree, also for a TIES or task-arithmetic candidate."""
    from umm.checkpoints.loading import load_causal_lm
    from umm.evolve.apply import LiveMerge
    from umm.merge.run import merge_state_dict

    dare = _recipe("dare_ties", tiny_models, {}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.8}])
    ties = _recipe("ties", tiny_models, {}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.8}])
    live = LiveMerge(dare, load_causal_lm(tiny_models["base"], device="cpu", dtype="float32"))
    assert not live.delta_mode
    for recipe in (dare, ties, _recipe("task_arithmetic", tiny_models, {"lambda": 1.3})):
        expected = merge_state_dict(recipe)
        live.apply(recipe)
        for name, p in live.model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[name].float(), rtol=1e-5, atol=1e-6, msg=name)
