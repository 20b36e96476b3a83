"""``run_combine`` end to end on the ``small`` suite: math and code (Llama) with list (GPT-NeoX).

Tiny budgets (3 candidates of population 2, 2 fusion steps, 4-6 items per task) keep each run to
seconds; what is checked is what the user relies on: the outputs, the model card, combine.json,
resuming without redoing a finished stage, dropped sources with their reasons, config errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from experts_fixtures import small_suite  # noqa: F401

from umm.combine.config import CombineConfigError, parse_config
from umm.combine.run import CombineError, CombineResult, make_scorer, run_combine

# synth-code is left out: its programs run in the sandbox, the slowest part of a tiny run
TASKS = [{"name": n, "search_size": 4, "test_size": 6} for n in ("synth-math", "synth-list")]


class Counter:
    """A scorer that counts its calls (split by split) around the default one."""

    def __init__(self, config) -> None:
        self.inner = make_scorer(config)
        self.calls: list[tuple[str, str]] = []
        self.interrupt_on: str | None = None

    def __call__(self, path, tasks, split, limit):
        if self.interrupt_on == split:
            self.interrupt_on = None
            raise KeyboardInterrupt  # a kill in the middle of the stage
        self.calls.append((Path(path).name, split))
        return self.inner(path, tasks, split, limit)


class Recorder:
    """CombineEvents that keep what they receive."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.notes: list[str] = []
        self.dropped_sources = []

    def stage(self, name, detail):
        self.stages.append(name)

    def note(self, text):
        self.notes.append(text)

    def warning(self, text):
        self.notes.append(text)

    def dropped(self, d):
        self.dropped_sources.append(d)

    def result(self, r):
        self.final = r


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from umm.experts.instruction_data import write_instruction_data

    return write_instruction_data(tmp_path_factory.mktemp("combine-data") / "data.jsonl", {"list": 4, "math": 4})


def config(suite, data: Path, **over):
    cfg = {
        "models": [str(suite.path("math")), str(suite.path("code")), str(suite.path("list"))],
        "base_model": str(suite.path("base")), "tasks": TASKS, "device": "cpu", "eval_batch_size": 8,
        "max_new_tokens": 16,
        "evolve": {"budget": {"evaluations": 3}, "population": 2, "layer_granularity": 2},
        "fusion": {"data": str(data), "k": 4, "max_length": 96, "layout": "raw",
                   "training": {"max_steps": 2, "batch_size": 2, "checkpoint_every": 1}},
    }
    cfg.update(over)
    return parse_config(cfg)


@pytest.fixture(scope="module")
def first(small_suite, data, tmp_path_factory: pytest.TempPathFactory):  # noqa: F811
    cfg = config(small_suite, data)
    run_dir = tmp_path_factory.mktemp("combine") / "run"
    scorer, events = Counter(cfg), Recorder()
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models are as fast on one, and on a shared machine more only wait
    try:
        result = run_combine(cfg, run_dir, events=events, scorer=scorer)
    finally:
        torch.set_num_threads(old)
    return {"cfg": cfg, "run_dir": run_dir, "result": result, "scorer": scorer, "events": events}


def test_two_families_fuse_then_evolve_and_write_every_output(first, small_suite) -> None:  # noqa: F811
    run_dir, result = first["run_dir"], first["result"]
    assert result.plan.stages == ["fuse", "evolve"]
    assert result.plan.fuse == [str(small_suite.path("list"))]
    assert result.plan.base == str(small_suite.path("base"))
    assert result.fused == {str(small_suite.path("list")): str(run_dir / "fused" / "list")}
    assert result.dropped == []
    assert first["events"].stages == ["check", "pivot", "fuse", "evolve", "compare", "decide"]
    for name in ("model/config.json", "model/model.safetensors", "model/README.md", "comparison.json",
                 "comparison.md", "combine.json", "fitness.png", "weights.png", "fused/list/config.json"):
        assert (run_dir / name).is_file(), name
    # the pivot was chosen on the search split only, then the search started at the best of the models it
    # merges (scored on search); every model then once on test
    search = [c for c in first["scorer"].calls if c[1] == "search"]
    test = [c for c in first["scorer"].calls if c[1] == "test"]
    assert sorted(n for n, _ in search) == ["code", "code", "list", "list", "math", "math"]
    start = yaml.safe_load((run_dir / "evolve" / "start.yaml").read_text())
    weights = [m["parameters"]["weight"] for m in start["models"]]  # a value, or one per layer
    assert sorted(max(w) if isinstance(w, list) else w for w in weights) == [0.1, 0.1, 0.9]
    assert sorted(n for n, _ in test) == ["code", "list", "math", "model"]
    # the evolve stage merged the pivot family and the fused list model onto the base
    recipe = (run_dir / "evolve" / "best_recipe.yaml").read_text()
    assert str(run_dir / "fused" / "list") in recipe and str(small_suite.path("math")) in recipe
    assert json.loads((run_dir / "evolve.json").read_text())["recipe_hash"] == result.recipe_hash


def test_comparison_card_and_combine_json(first) -> None:
    run_dir, result = first["run_dir"], first["result"]
    table = json.loads((run_dir / "comparison.json").read_text())
    assert [(r["name"], r["kind"]) for r in table["rows"]] == [
        ("merged", "evolved"), ("math", "source"), ("code", "source"), ("list", "source")]
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["list"]["family"] != rows["math"]["family"] == rows["code"]["family"] == rows["merged"]["family"]
    best = max((r for r in table["rows"] if r["kind"] == "source"), key=lambda r: (r["objective"], r["name"] == table["best_source"]))
    assert table["best_source"] == result.decision.best_source and best["objective"] == rows[table["best_source"]]["objective"]
    diff = result.decision.diff_vs_best_source
    assert diff.diff == pytest.approx(rows["merged"]["objective"] - rows[table["best_source"]]["objective"])
    assert result.decision.published == (diff.ci_low > 0)
    card = (run_dir / "model" / "README.md").read_text()
    assert "pairwise fusion" in card and "evolutionary layer-wise merge" in card
    assert "list: fused into the pivot" in card and result.decision.text in card and result.recipe_hash in card
    assert "| merged | evolved |" in card
    again = CombineResult.model_validate_json((run_dir / "combine.json").read_text())
    assert again == result


def test_resume_of_a_finished_run_redoes_nothing(first, one_thread) -> None:
    run_dir = first["run_dir"]
    watched = [run_dir / "fused" / "list" / "model.safetensors", run_dir / "model" / "model.safetensors",
               run_dir / "evolve" / "history.jsonl", run_dir / "evolve" / "search_state.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    scorer, events = Counter(first["cfg"]), Recorder()
    result = run_combine(first["cfg"], run_dir, resume=True, events=events, scorer=scorer)
    assert scorer.calls == []
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert result == first["result"]
    with pytest.raises(CombineError, match="--resume"):
        run_combine(first["cfg"], run_dir, scorer=scorer)
    changed = first["cfg"].model_copy(update={"seed": 1})
    with pytest.raises(CombineError, match="differs .* in seed"):
        run_combine(changed, run_dir, resume=True, scorer=scorer)


def test_low_coverage_source_is_dropped_and_previous_joins_and_is_compared(first, small_suite, data, tmp_path, one_thread) -> None:  # noqa: F811
    previous = first["run_dir"] / "model"
    cfg = config(small_suite, data, pivot=str(small_suite.path("math")), previous=str(previous),
                 fusion={"data": str(data), "min_vocab_coverage": 0.95, "layout": "raw"})
    scorer, events = Counter(cfg), Recorder()
    result = run_combine(cfg, tmp_path / "run", events=events, scorer=scorer)
    assert [d.source for d in result.dropped] == [str(small_suite.path("list"))]
    assert "vocabulary coverage" in result.dropped[0].reason and "0.95" in result.dropped[0].reason
    assert events.dropped_sources == result.dropped and result.fused == {}
    # the pivot came from the config: the search split scored only the merged models, for the search's start
    assert sorted(n for n, split in scorer.calls if split == "search") == ["code", "math", "model"]
    assert result.plan.family == [str(small_suite.path("math")), str(small_suite.path("code")), str(previous)]
    kinds = [(r.kind, r.name) for r in result.comparison.rows]
    assert kinds[-1] == ("previous", "previous: model") and result.decision.previous == "previous: model"
    assert result.decision.diff_vs_previous is not None
    assert result.comparison.evolved_minus_previous == result.decision.diff_vs_previous
    assert "**dropped**" in (tmp_path / "run" / "model" / "README.md").read_text()


def test_bad_data_drops_the_source_and_a_kill_during_compare_resumes(small_suite, tmp_path, one_thread) -> None:  # noqa: F811
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\nnot json\n')
    cfg = config(small_suite, bad, pivot=str(small_suite.path("code")))
    scorer, events = Counter(cfg), Recorder()
    scorer.interrupt_on = "test"
    with pytest.raises(KeyboardInterrupt):
        run_combine(cfg, tmp_path / "run", events=events, scorer=scorer)
    (reason,) = [d.reason for d in events.dropped_sources]
    assert "bad.jsonl:2: not valid JSON" in reason
    evolved = (tmp_path / "run" / "evolve.json").stat().st_mtime_ns
    result = run_combine(cfg, tmp_path / "run", resume=True, events=Recorder(), scorer=scorer)
    assert (tmp_path / "run" / "evolve.json").stat().st_mtime_ns == evolved  # not evolved again
    assert [d.reason for d in result.dropped] == [reason]
    assert result.plan.fuse == [str(small_suite.path("list"))] and result.fused == {}
    assert (tmp_path / "run" / "model" / "config.json").is_file()


class KillAt:
    """A progress sink that raises KeyboardInterrupt (a kill) at the first advance of the first bar
    whose label starts with ``prefix``; later bars pass."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.fired = False

    def start(self, total, desc, unit):
        sink = self

        class Bar:
            def advance(self, n=1, **info):
                if not sink.fired and desc.startswith(sink.prefix):
                    sink.fired = True
                    raise KeyboardInterrupt

            def close(self):
                pass

        return Bar()


def test_kills_during_the_fusion_and_the_search_resume_to_the_uninterrupted_result(
        first, small_suite, data, tmp_path, one_thread) -> None:  # noqa: F811
    cfg = first["cfg"].model_copy(update={"pivot": first["result"].plan.pivot})  # no search scoring again
    run_dir = tmp_path / "run"
    for prefix in ("teacher list", "evolve"):
        kill = KillAt(prefix)
        with pytest.raises(KeyboardInterrupt):
            run_combine(cfg, run_dir, resume=run_dir.exists(), scorer=Counter(cfg), on_progress=kill)
        assert kill.fired
    assert (run_dir / "fused" / "list.json").is_file() and not (run_dir / "evolve.json").exists()
    result = run_combine(cfg, run_dir, resume=True, scorer=Counter(cfg))
    # the same recipe (up to where the fused model lives), the same scores, the same decision
    recipe = (run_dir / "evolve" / "best_recipe.yaml").read_text().replace(str(run_dir), "RUN")
    assert recipe == (first["run_dir"] / "evolve" / "best_recipe.yaml").read_text().replace(str(first["run_dir"]), "RUN")
    assert [r.model_copy(update={"path": None}) for r in result.comparison.rows] == [
        r.model_copy(update={"path": None}) for r in first["result"].comparison.rows]
    assert result.decision == first["result"].decision
    for name in ("fused/list/model.safetensors", "model/model.safetensors"):  # the same weights
        assert (run_dir / name).read_bytes() == (first["run_dir"] / name).read_bytes(), name


def test_config_errors_name_the_key(small_suite, data, tmp_path) -> None:  # noqa: F811
    with pytest.raises(CombineConfigError, match=r"unknown key 'fusion.kk'; valid keys here: data, .*min_vocab_coverage"):
        config(small_suite, data, fusion={"kk": 1})
    with pytest.raises(CombineConfigError, match=r"evolve.budget.evaluations: .*at least 1"):
        config(small_suite, data, evolve={"budget": {"evaluations": 0}})
    with pytest.raises(CombineConfigError, match=r"models: List should have at least 2 items"):
        config(small_suite, data, models=[str(small_suite.path("math"))])
    with pytest.raises(CombineConfigError, match=r"pivot .* is not one of the models"):
        config(small_suite, data, pivot=str(small_suite.path("base")))
    with pytest.raises(CombineConfigError, match=r"fusion.min_vocab_coverage: .*less than or equal to 1"):
        config(small_suite, data, fusion={"min_vocab_coverage": 2})
    cfg = config(small_suite, data, pivot=str(small_suite.path("math")), fusion={})
    with pytest.raises(CombineConfigError, match="fusion.data is not set"):
        run_combine(cfg, tmp_path / "run", scorer=Counter(cfg))


def test_vocabulary_coverage_is_the_share_of_source_tokens_the_pivot_has(small_suite) -> None:  # noqa: F811
    from umm.checkpoints.loading import load_tokenizer
    from umm.fusion.align import vocab_coverage

    math, listing = load_tokenizer(small_suite.path("math")), load_tokenizer(small_suite.path("list"))
    assert vocab_coverage(math, load_tokenizer(small_suite.path("code"))) == 1.0  # one tokenizer
    # the list expert's 256-token vocabulary is mostly inside math's 384 tokens, not the reverse
    assert 0.5 < vocab_coverage(listing, math) < 1.0
    assert vocab_coverage(math, listing) < vocab_coverage(listing, math)
