"""The search machinery without models: config validation, bounds transform, CMA-ES / random
search on a known objective, budget accounting, and exact resume by replay."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from umm.errors import UmmError
from umm.evolve.config import EvolveConfigError, load_config, parse_config
from umm.evolve.search import BudgetError, Scored, generations_for, run_search
from umm.evolve.state import ResumeError, SearchState, load_state, save_state
from umm.evolve.transform import BoxTransform

TARGET = np.array([0.15, 0.8, 0.35, 0.6, 0.9, 0.25])


def quadratic(xs, generation):
    return [
        Scored({"q": -float(((x - TARGET) ** 2).sum())}, -float(((x - TARGET) ** 2).sum()), 0.0)
        for x in xs
    ]


def fresh_state(optimizer: str, transform: BoxTransform, seed: int = 3) -> SearchState:
    z0 = transform.to_unbounded(np.full(transform.dimension, 0.5))
    return SearchState(optimizer, seed, transform.dimension, 8, 0.7, [float(v) for v in z0])


@pytest.fixture
def box() -> BoxTransform:
    return BoxTransform(np.zeros(6), np.ones(6))


# -- config ------------------------------------------------------------------------------------


def _cfg(**over):
    data = {"models": ["a", "b"], "base_model": "base", "tasks": [{"name": "synth-math"}]}
    data.update(over)
    return data


def test_config_defaults_and_task_shorthand() -> None:
    cfg = parse_config(_cfg(tasks=["synth-math", {"name": "synth-code", "weight": 2}]))
    assert [t.name for t in cfg.tasks] == ["synth-math", "synth-code"]
    assert cfg.tasks[1].weight == 2 and cfg.optimizer == "cma" and cfg.budget.evaluations == 100
    assert cfg.bounds_for("density") == (0.1, 1.0) and cfg.bounds_for("weight") == (0.0, 1.0)
    with pytest.raises(ValidationError):
        cfg.seed = 4  # frozen


def test_config_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(EvolveConfigError) as e:
        parse_config(_cfg(populaton=8))
    msg = str(e.value)
    assert "populaton" in msg and "population" in msg and "sigma0" in msg
    with pytest.raises(EvolveConfigError) as e:
        parse_config(_cfg(budget={"evals": 3}))
    assert "budget.evals" in str(e.value) and "evaluations, seconds" in str(e.value)
    with pytest.raises(EvolveConfigError) as e:
        parse_config(_cfg(tasks=[{"name": "x", "wieght": 1}]))
    assert "wieght" in str(e.value) and "search_size" in str(e.value)


def test_config_rejects_zero_budget_and_bad_bounds() -> None:
    with pytest.raises(EvolveConfigError, match="budget.evaluations must be at least 1"):
        parse_config(_cfg(budget={"evaluations": 0}))
    with pytest.raises(EvolveConfigError, match="low < high"):
        parse_config(_cfg(bounds={"weight": [1, 0]}))
    with pytest.raises(EvolveConfigError, match="tasks listed twice"):
        parse_config(_cfg(tasks=["t", "t"]))


def test_config_file_resolves_relative_models_and_overrides(tmp_path) -> None:
    (tmp_path / "m1").mkdir()
    (tmp_path / "cfg.yaml").write_text("models: [m1, elsewhere]\ntasks: [synth-math]\n")
    cfg = load_config(tmp_path / "cfg.yaml", optimizer="random")
    # one path rule: relative to the config's folder, whether or not the folder exists yet
    assert cfg.models == [str((tmp_path / "m1").resolve()), str((tmp_path / "elsewhere").resolve())]
    assert cfg.optimizer == "random"
    (tmp_path / "bad.yaml").write_text("models: [a\n")
    with pytest.raises(EvolveConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(EvolveConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_example_config_is_valid() -> None:
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[1] / "examples" / "evolve.yaml")
    assert cfg.tasks and cfg.models


# -- transform ---------------------------------------------------------------------------------


def test_transform_round_trip_and_stays_in_bounds() -> None:
    t = BoxTransform(np.array([0.0, 0.1, -1.0]), np.array([1.0, 1.0, 3.0]))
    x = np.array([0.3, 0.55, 2.0])
    assert np.allclose(t.to_bounded(t.to_unbounded(x)), x)
    for z in (np.full(3, -1e3), np.full(3, 1e3), np.random.default_rng(0).normal(0, 30, 3)):
        v = t.to_bounded(z)
        assert np.all(v >= t.low) and np.all(v <= t.high) and np.all(np.isfinite(v))
    # start values on a bound (density 1.0) are finite in the search space
    assert np.all(np.isfinite(t.to_unbounded(np.array([0.0, 1.0, 3.0]))))


# -- search ------------------------------------------------------------------------------------


def test_cma_beats_random_with_the_same_budget(box: BoxTransform) -> None:
    cma_state = run_search(fresh_state("cma", box), box, quadratic, generations=25)
    rnd_state = run_search(fresh_state("random", box), box, quadratic, generations=25)
    assert cma_state.evaluations == rnd_state.evaluations == 1 + 25 * 8
    best = cma_state.best()
    assert best.fitness > -0.01 and np.allclose(best.x, TARGET, atol=0.08)
    assert best.fitness > rnd_state.best().fitness
    # the starting point is generation 0, evaluated once
    assert cma_state.generations[0].candidates[0].x == pytest.approx([0.5] * 6)


def test_same_seed_same_search_whatever_else_uses_numpy(box: BoxTransform) -> None:
    def noisy(xs, g):
        np.random.rand(17)
        return quadratic(xs, g)

    a = run_search(fresh_state("cma", box), box, quadratic, generations=4)
    b = run_search(fresh_state("cma", box), box, noisy, generations=4)
    assert [c.z for g in a.generations for c in g.candidates] == [c.z for g in b.generations for c in g.candidates]
    c = run_search(fresh_state("cma", box, seed=4), box, quadratic, generations=4)
    assert a.generations[1].candidates[0].z != c.generations[1].candidates[0].z


def test_budget_accounting() -> None:
    assert generations_for(17, 8) == 2 and generations_for(9, 8) == 1
    with pytest.raises(BudgetError, match="at least 9"):
        generations_for(8, 8)
    assert issubclass(BudgetError, UmmError)


def test_wall_time_budget_stops_between_generations(box: BoxTransform) -> None:
    def slow(xs, g):
        return [Scored(r.scores, r.fitness, r.seconds) for r in quadratic(xs, g)]

    state = fresh_state("cma", box)
    state = run_search(state, box, slow, generations=1000, max_seconds=1e-9)
    assert len(state.generations) == 1  # the start point, then the budget is spent


@pytest.mark.parametrize("optimizer", ["cma", "random"])
def test_resume_from_saved_state_equals_uninterrupted(tmp_path, box: BoxTransform, optimizer: str) -> None:
    full = run_search(fresh_state(optimizer, box), box, quadratic, generations=12)
    saved = []
    part = run_search(
        fresh_state(optimizer, box), box, quadratic, generations=5,
        save=lambda s: (save_state(tmp_path, s), saved.append(len(s.generations))),
    )
    assert saved == [1, 2, 3, 4, 5, 6]
    restored = load_state(tmp_path)
    assert restored.to_json() == json.loads(json.dumps(part.to_json()))
    resumed = run_search(restored, box, quadratic, generations=12)
    def candidates(s: SearchState) -> list:
        return [json.loads(json.dumps(c.__dict__)) for g in s.generations for c in g.candidates]

    assert candidates(resumed) == candidates(full)
    assert resumed.best().x == full.best().x


def test_resume_refuses_a_state_that_does_not_replay(tmp_path, box: BoxTransform) -> None:
    state = run_search(fresh_state("cma", box), box, quadratic, generations=3)
    state.generations[2].candidates[0].z[0] += 0.5
    with pytest.raises(ResumeError, match="does not reproduce"):
        run_search(state, box, quadratic, generations=5)
    with pytest.raises(ResumeError, match="nothing to resume"):
        load_state(tmp_path / "nowhere")


def test_cli_reports_a_bad_config_with_exit_code_2(tmp_path, capsys) -> None:
    from umm.cli import main

    cfg = tmp_path / "evolve.yaml"
    cfg.write_text("models: [a]\ntasks: [synth-math]\nbudgit: {evaluations: 3}\n")
    with pytest.raises(SystemExit) as e:
        main(["evolve", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "budgit" in err and "budget" in err and "layer_granularity" in err
