"""The user's path: ``umm evolve examples/evolve.yaml``, ``umm fuse examples/fuse.yaml`` and
``umm combine examples/combine.yaml`` on a
fresh umm home (the examples prepare the expert suite and the fusion data themselves), outputs
under the current directory, never in the checkout's ``examples/``.

The ``small`` suite stands in for ``full`` (``--suite small``) and ``--set`` shrinks the budgets,
so each run takes seconds; the suite is the session's ``small_suite``, linked into the fresh umm
home so that ``ensure_suite`` finds it current instead of building it again.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from experts_fixtures import small_suite  # noqa: F401
from typer.testing import CliRunner

from umm.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def fresh_home(small_suite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:  # noqa: F811
    """An empty umm home holding only the small suite, and an empty current directory."""
    home = tmp_path / "home"
    (home / "experts").mkdir(parents=True)
    (home / "experts" / "small").symlink_to(small_suite.root, target_is_directory=True)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("UMM_HOME", str(home))
    monkeypatch.chdir(cwd)
    return cwd


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250", "UMM_NO_PROGRESS": "1"})


def test_evolve_example_runs_on_a_fresh_home(fresh_home: Path) -> None:
    before = _listing(EXAMPLES)
    tasks = "[{name: synth-math, search_size: 3, test_size: 4}, {name: synth-code, search_size: 3, test_size: 4}]"
    r = _invoke("evolve", str(EXAMPLES / "evolve.yaml"), "--suite", "small", "--device", "cpu",
                "--set", "budget.evaluations=5", "--set", "population=4", "--set", f"tasks={tasks}",
                "--set", "baselines=[task_arithmetic]", "--set", "layer_granularity=2", "--threads", "1")
    assert r.exit_code == 0, r.output
    run = fresh_home / "runs" / "evolve-evolve-cma-seed0"  # the default run folder: under the cwd
    table = json.loads((run / "comparison.json").read_text())
    assert [row["kind"] for row in table["rows"]] == ["evolved", "baseline", "source", "source", "baseline"]
    assert set(table["evolved_minus_best_source"]) == {"diff", "ci_low", "ci_high"}
    assert (run / "merged" / "config.json").is_file() and (run / "fitness.png").is_file()
    assert _listing(EXAMPLES) == before


def test_fuse_example_runs_on_a_fresh_home(fresh_home: Path) -> None:
    before = _listing(EXAMPLES)
    r = _invoke("fuse", str(EXAMPLES / "fuse.yaml"), "--suite", "small", "--device", "cpu", "--threads", "1",
                "--set", "data=instructions:list=4,math=4", "--set", "max_length=64",
                "--set", "training={max_steps: 1, batch_size: 2, checkpoint_every: 1}",
                "--set", "eval={tasks: [synth-math, synth-list], search_limit: 2, test_limit: 2, max_new_tokens: 4}")
    assert r.exit_code == 0, r.output
    report = json.loads((fresh_home / "fused-math-list" / "fuse_report.json").read_text())
    assert Path(report["pivot"]).name == "math" and [Path(s).name for s in report["sources"]] == ["list"]
    data = Path(json.loads((fresh_home / "fused-math-list" / "fusion_recipe.json").read_text())["data"])
    assert data.is_relative_to(Path.cwd().parent / "home") and data.name == "instructions-list4-math4.jsonl"
    assert _listing(EXAMPLES) == before


def test_combine_example_runs_on_a_fresh_home(fresh_home: Path) -> None:
    before = _listing(EXAMPLES)
    tasks = "[{name: synth-math, search_size: 3, test_size: 4}, {name: synth-list, search_size: 3, test_size: 4}]"
    r = _invoke("combine", str(EXAMPLES / "combine.yaml"), "--suite", "small", "--device", "cpu", "--threads", "1",
                "--set", f"tasks={tasks}", "--set", "max_new_tokens=8", "--set", "pivot=suite:small/math",
                "--set", "evolve={budget: {evaluations: 3}, population: 2, layer_granularity: 2}",
                "--set", "fusion.data=instructions:list=4,math=4", "--set", "fusion.max_length=64",
                "--set", "fusion.training={max_steps: 1, batch_size: 2, checkpoint_every: 1}")
    assert r.exit_code == 0, r.output
    run = fresh_home / "runs" / "combine-combine-seed0"  # the default run folder: under the cwd
    result = json.loads((run / "combine.json").read_text())
    assert result["plan"]["stages"] == ["fuse", "evolve"] and [Path(s).name for s in result["plan"]["fuse"]] == ["list"]
    assert result["decision"]["text"] in " ".join(r.output.split())  # the decision is printed
    assert (run / "model" / "README.md").is_file() and (run / "comparison.md").is_file()
    assert _listing(EXAMPLES) == before


def test_config_inputs_are_checked(fresh_home: Path) -> None:
    r = _invoke("evolve", str(EXAMPLES / "evolve.yaml"), "--suite", "tiny")
    assert r.exit_code == 2 and "unknown expert suite variant 'tiny'" in r.output
    r = _invoke("evolve", str(EXAMPLES / "evolve.yaml"), "--set", "budget")
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    plain = fresh_home / "plain.yaml"
    plain.write_text("models: [a, b]\ntasks: [synth-math]\n")
    r = _invoke("evolve", str(plain), "--suite", "small")
    assert r.exit_code == 2 and "suite:<variant>/<model>" in r.output
    bad = fresh_home / "bad.yaml"
    bad.write_text("models: [suite:small]\ntasks: [synth-math]\n")
    r = _invoke("evolve", str(bad))
    assert r.exit_code == 2 and "suite:<variant>/<model>" in r.output
    r = _invoke("fuse", str(EXAMPLES / "fuse.yaml"), "--suite", "small", "--set", "data=instructions:list=x")
    assert r.exit_code == 2 and "instructions:<domain>=<n>" in r.output
    r = _invoke("combine", str(EXAMPLES / "combine.yaml"), "--suite", "small", "--set", "fusion.kk=1")
    assert r.exit_code == 2 and "unknown key 'fusion.kk'" in r.output
