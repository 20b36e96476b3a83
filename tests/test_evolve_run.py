"""The ``umm evolve`` pipeline end to end on tiny random experts with a cheap probe task:
outputs, recipe round trip through ``umm merge``, bad input, and kill -9 + ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from evolve_probe import make_references, register_probe

HERE = Path(__file__).resolve().parent


# tiny models run faster on one thread (no intra-op scheduling): conftest's fixture, for every test
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def probe(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Task ``mimic-math``: reproduce the math expert's greedy completions."""
    refs = make_references(tiny_models["math"], tmp_path_factory.mktemp("probe") / "refs.json", name="mimic-math")
    register_probe(refs)
    return {"refs": refs}


def _config(tiny_models: dict[str, Path], **over) -> dict:
    cfg = {
        "models": [str(tiny_models["math"]), str(tiny_models["code"])],
        "base_model": str(tiny_models["base"]),
        "method": "task_arithmetic",
        "tasks": [{"name": "mimic-math", "search_size": 8, "test_size": 16}],
        "population": 4,
        "budget": {"evaluations": 1 + 4 * 2},
        "seed": 1,
        "device": "cpu",
        "batch_size": 32,
    }
    cfg.update(over)
    return cfg


def test_evolve_writes_every_output(probe, tiny_models, tmp_path, recorder) -> None:
    import torch

    from umm.checkpoints.reader import Checkpoint
    from umm.evolve.config import parse_config
    from umm.evolve.run import run_evolve
    from umm.merge import MergeRecipe
    from umm.merge.run import merge_state_dict

    cfg = parse_config(_config(tiny_models))
    seen = []
    result = run_evolve(cfg, tmp_path / "run", on_generation=lambda s, g, total: seen.append((g.index, total)),
                        on_progress=recorder)
    run = tmp_path / "run"
    assert seen == [(0, 2), (1, 2), (2, 2)]
    # the bars umm evolve draws: candidates of the search (with the best fitness), then the merge
    search, *_, merged = recorder.bars
    assert search.desc == f"evolve ({cfg.optimizer})" and search.unit == "candidate"
    assert search.total == search.done == 9 and "best" in search.info
    assert merged.desc == "merge (task_arithmetic)" and merged.total == merged.done > 0
    assert all(b.closed for b in recorder.bars)

    # history: one line per candidate, named genes inside the bounds, fitness = (weighted mean) score
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and [r["generation"] for r in rows[:2]] == [0, 1]
    assert set(rows[0]["genome"]) == {"g0/math/weight", "g0/code/weight", "g1/math/weight", "g1/code/weight"}
    assert rows[0]["genome"]["g0/math/weight"] == pytest.approx(0.5)
    for r in rows:
        assert all(0.0 <= v <= 1.0 for v in r["genome"].values())
        assert r["fitness"] == pytest.approx(r["scores"]["mimic-math"]) and 0 <= r["fitness"] <= 1
        assert r["seconds"] >= r["apply_seconds"] > 0
    best = max(rows, key=lambda r: r["fitness"])
    assert result.state.best().fitness == best["fitness"]
    assert len({r["fitness"] for r in rows}) > 1, "the probe fitness should vary with the weights"

    # pictures
    for png in ("fitness.png", "weights.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the best recipe is a plain mergekit recipe whose merge is the model written to run/merged
    data = yaml.safe_load((run / "best_recipe.yaml").read_text())
    assert data["merge_method"] == "task_arithmetic" and data["base_model"] == str(tiny_models["base"])
    recipe = MergeRecipe.load(run / "best_recipe.yaml")
    expected = merge_state_dict(recipe)
    assert result.model_dir == run / "merged" and not (run / "model").exists()
    with Checkpoint.open(run / "merged") as written:
        for name, t in expected.items():
            torch.testing.assert_close(written.get_tensor(name).float(), t.float(), rtol=1e-5, atol=1e-6)
    w = recipe.models[0].parameters["weight"]
    gene = [best["genome"]["g0/math/weight"], best["genome"]["g1/math/weight"]]
    assert (w == pytest.approx(gene)) if isinstance(w, list) else (w == pytest.approx(gene[0]))

    # the reference lines of the plot: each source and untuned merge on the search items, stored
    refs = json.loads((run / "references.json").read_text())
    assert refs["split"] == "search"
    assert [(r["name"], r["kind"]) for r in refs["rows"]] == [
        ("source: math", "source"), ("source: code", "source"),
        ("untuned task_arithmetic", "baseline"), ("untuned ties", "baseline"),
    ]
    assert next(r for r in refs["rows"] if r["name"] == "source: math")["objective"] == pytest.approx(1.0, abs=0.15)

    # the random-search baseline: same seed and budget, its own state and history
    random_rows = [json.loads(x) for x in (run / "random" / "history.jsonl").read_text().splitlines()]
    assert len(random_rows) == 9 and random_rows[0]["genome"] == rows[0]["genome"]
    assert [r["genome"] for r in random_rows[1:]] != [r["genome"] for r in rows[1:]]

    # the final table: evolved, sources, base and baselines on test, typed rows, paired CI
    table = json.loads((run / "comparison.json").read_text())
    assert table["split"] == "test" and "weighted mean" in table["objective"]
    by_name = {r["name"]: r for r in table["rows"]}
    assert [(r["name"], r["kind"]) for r in table["rows"]] == [
        ("evolved (cma, task_arithmetic)", "evolved"), ("base: base", "baseline"),
        ("source: math", "source"), ("source: code", "source"), ("untuned task_arithmetic", "baseline"),
        ("untuned ties", "baseline"), ("random search (same budget)", "baseline"),
    ]
    for r in table["rows"]:
        assert set(r) >= {"name", "kind", "scores", "objective", "n"}
        lo, hi = r["ci"]["mimic-math"]
        assert lo - 1e-9 <= r["scores"]["mimic-math"] <= hi + 1e-9 and r["n"] == {"mimic-math": 16}
        assert r["objective"] == pytest.approx(r["scores"]["mimic-math"])
    assert by_name["source: math"]["scores"]["mimic-math"] == pytest.approx(1.0, abs=0.1)  # mimics itself
    assert table["best_source"] == "source: math"
    d = table["evolved_minus_best_source"]
    assert d["diff"] == pytest.approx(by_name["evolved (cma, task_arithmetic)"]["objective"] - by_name["source: math"]["objective"])
    assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert by_name["evolved (cma, task_arithmetic)"]["path"] == str(run / "merged")
    assert "95% CI" in (run / "comparison.md").read_text() and "umm eval" in (run / "comparison.md").read_text()

    # the evolved row is what `umm eval RUN/merged --split test` gives (the command comparison.json names)
    from typer.testing import CliRunner

    from umm.cli import app

    [command] = table["eval_commands"]
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(app, [*command.split()[1:], "--device", "cpu", "--threads", "1", "--output", str(out)])
    assert r.exit_code == 0, r.output
    evald = json.loads(out.read_text())["scores"]["mimic-math"]
    assert evald["n"] == 16 and evald["score"] == by_name["evolved (cma, task_arithmetic)"]["scores"]["mimic-math"]

    # a finished run folder is not silently overwritten
    from umm.evolve.run import EvolveError

    with pytest.raises(EvolveError, match="--resume"):
        run_evolve(cfg, run)


@pytest.mark.skipif(not Path("/tmp/mergekit-venv/bin/mergekit-yaml").exists(), reason="mergekit not installed")
def test_best_recipe_runs_in_mergekit(probe, tiny_models, tmp_path) -> None:
    from umm.evolve.config import parse_config
    from umm.evolve.run import run_evolve

    cfg = parse_config(_config(tiny_models, budget={"evaluations": 5}, compare=False, write_model=False))
    run_evolve(cfg, tmp_path / "run")
    out = subprocess.run(
        ["/tmp/mergekit-venv/bin/mergekit-yaml", str(tmp_path / "run" / "best_recipe.yaml"), str(tmp_path / "mk")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert list((tmp_path / "mk").glob("*.safetensors"))


def test_bad_input_is_reported(probe, tiny_models, tmp_path) -> None:
    from umm.checkpoints.errors import IncompatibleCheckpointsError
    from umm.evolve.config import parse_config
    from umm.evolve.run import EvolveError, run_evolve
    from umm.evolve.search import BudgetError
    from umm.evolve.state import ResumeError
    from umm.experts.random_models import make_random_llama

    # a budget too small for one generation
    with pytest.raises(BudgetError, match="at least 5"):
        run_evolve(parse_config(_config(tiny_models, budget={"evaluations": 3})), tmp_path / "a")
    # an unknown task, and a task without a search split
    with pytest.raises(Exception, match="unknown task 'nope'"):
        run_evolve(parse_config(_config(tiny_models, tasks=["nope"])), tmp_path / "b")
    refs = json.loads(probe["refs"].read_text())
    refs["name"] = "mimic-testonly"
    from umm.eval.splits import eval_split_of

    refs["items"] = [it for it in refs["items"] if eval_split_of(it["prompt"]) == "test"]
    (tmp_path / "testonly.json").write_text(json.dumps(refs))
    register_probe(tmp_path / "testonly.json")
    with pytest.raises(EvolveError, match="no 'search' split"):
        run_evolve(parse_config(_config(tiny_models, tasks=["mimic-testonly"])), tmp_path / "c")
    # incompatible models: the error names the tensor and points to fusion
    wide = make_random_llama(tmp_path / "wide", seed=5, hidden_size=32)
    with pytest.raises(IncompatibleCheckpointsError, match="(?s)tensor.*umm fuse"):
        run_evolve(parse_config(_config(tiny_models, models=[str(tiny_models["math"]), str(wide)])), tmp_path / "d")
    # resume of a folder without a search, and of a folder started with another config
    with pytest.raises(ResumeError, match="nothing to resume"):
        run_evolve(parse_config(_config(tiny_models)), tmp_path / "e", resume=True)


def _driver(refs: Path, cfg_path: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(HERE / "evolve_probe.py"), str(refs), "--", str(cfg_path), "--run-dir", str(run_dir), *extra]


def test_kill_and_resume_gives_the_uninterrupted_result(probe, tiny_models, tmp_path) -> None:
    from umm.evolve.config import load_config, parse_config
    from umm.evolve.run import run_evolve
    from umm.evolve.state import ResumeError

    cfg = _config(tiny_models, population=3, budget={"evaluations": 1 + 3 * 4}, write_model=False)
    cfg["tasks"][0]["search_size"] = 4
    cfg_path = tmp_path / "evolve.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "UMM_NO_PROGRESS": "1", "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}

    # a real `umm evolve` process, SIGKILLed right after its first finished generation
    run = tmp_path / "killed"
    proc = subprocess.Popen(_driver(probe["refs"], cfg_path, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state_file = run / "search_state.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state_file.exists() and len(json.loads(state_file.read_text())["generations"]) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the search ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    done = len(json.loads(state_file.read_text())["generations"])
    assert 2 <= done < 5
    assert not (run / "best_recipe.yaml").exists()

    # a resume with another search setting is refused
    with pytest.raises(ResumeError, match="seed"):
        run_evolve(parse_config({**cfg, "seed": 2}), run, resume=True)

    resumed = run_evolve(load_config(cfg_path), run, resume=True)
    full = run_evolve(load_config(cfg_path), tmp_path / "full")

    def candidates(d: Path) -> list[tuple]:
        rows = [json.loads(x) for x in (d / "history.jsonl").read_text().splitlines()]
        return [(r["generation"], r["candidate"], r["genome"], r["scores"], r["fitness"]) for r in rows]

    assert candidates(run) == candidates(tmp_path / "full")
    assert len(candidates(run)) == 13 and resumed.state.evaluations == full.state.evaluations == 13
    assert (run / "best_recipe.yaml").read_text() == (tmp_path / "full" / "best_recipe.yaml").read_text()
    # the random-search baseline ran in the resumed session and matches the uninterrupted one
    assert candidates(run / "random") == candidates(tmp_path / "full" / "random") and len(candidates(run / "random")) == 13
    assert (run / "references.json").read_text() == (tmp_path / "full" / "references.json").read_text()
