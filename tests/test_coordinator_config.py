"""Coordinator config/init, SQLite state and planning: no network needed."""

from __future__ import annotations

import os
import sqlite3

import pytest
import yaml
from pydantic import ValidationError

from coordinator.cli import main
from coordinator.config import (
    CONFIG_NAME,
    KEY_NAME,
    CoordinatorConfig,
    CoordinatorConfigError,
    config_template,
    load_config,
    parse_config,
)
from coordinator.db import StateDB, StateError
from coordinator.planner import Candidate, plan_round
from coordinator.steps import DiscoverStep


def cli(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def test_init_writes_a_commented_config_and_key_that_load(tmp_path, capsys):
    assert cli("init", str(tmp_path / "c"), "--network", "testnet") == 0
    out = capsys.readouterr().out
    assert "ssh-rsa" in out
    text = (tmp_path / "c" / CONFIG_NAME).read_text()
    assert text.count("\n# ") > 10  # every key documented
    cfg = load_config(tmp_path / "c" / CONFIG_NAME)
    assert cfg.network == "testnet"
    assert cfg.data_dir == (tmp_path / "c" / "data").resolve() and cfg.key_path == (tmp_path / "c" / KEY_NAME).resolve()
    assert oct(os.stat(cfg.key_path).st_mode & 0o777) == "0o400"
    from umm.net.keys import load_key, public_key_text

    assert public_key_text(load_key(cfg.key_path)) in out.replace("\n", "")
    assert cli("init", str(tmp_path / "c")) == 2  # a second init would silently change the identity
    assert "already exists" in capsys.readouterr().err


def test_config_errors_name_the_key_and_list_valid_ones(tmp_path):
    with pytest.raises(CoordinatorConfigError, match=r"unknown key 'eval_limt'; valid keys here: .*eval_limit"):
        parse_config({"eval_limt": 3})
    with pytest.raises(CoordinatorConfigError, match="tasks.*unknown task"):
        parse_config({"tasks": ["nope"]})
    with pytest.raises(CoordinatorConfigError, match="network"):
        parse_config({"network": "has space"})
    cfg = parse_config({"tasks": ["synth-math", "gsm8k", "synth-list"]})
    assert cfg.domains() == {"math": ["synth-math", "gsm8k"], "list": ["synth-list"]}
    with pytest.raises(ValidationError):  # frozen
        cfg.network = "x"  # type: ignore[misc]
    with pytest.raises(CoordinatorConfigError, match="umm-coordinator init"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(CoordinatorConfigError, match=r"unknown key 'evolve.methd'; valid keys here: method, "):
        parse_config({"evolve": {"methd": "ties"}})
    with pytest.raises(CoordinatorConfigError, match=r"unknown key 'fusion.training.rate'; valid keys here: lr, "):
        parse_config({"fusion": {"training": {"lr": 1e-4, "rate": 1}}})
    with pytest.raises(CoordinatorConfigError, match="evolve.*bounds.weight must be"):  # EvolveConfig's own check
        parse_config({"evolve": {"bounds": {"weight": [1.0, 0.0]}}})
    with pytest.raises(CoordinatorConfigError, match="evolve.models"):  # the round decides which models
        parse_config({"evolve": {"models": ["a", "b"]}})


def test_the_template_is_generated_from_the_defaults_and_loads_back_into_them():
    text = config_template()
    assert parse_config(yaml.safe_load(text)) == CoordinatorConfig()
    for name, field in CoordinatorConfig.model_fields.items():  # every key, documented by its field
        assert f"\n{name}: " in text or f"\n{name}:\n" in text, name
        assert field.description and field.description.split()[0] in text, name
    assert "\n  method: task_arithmetic\n" in text and "\n    evaluations: 40\n" in text  # nested sections, indented
    custom = parse_config({"network": "other", "evolve": {"population": 4}})
    assert parse_config(yaml.safe_load(config_template(custom))) == custom


def test_evolve_and_fusion_sections_nest_the_librarys_settings(tmp_path):
    """The sections are the library's types: a round's job gets them unchanged."""
    from coordinator.jobspec import CombineJob
    from umm.combine.config import CombineConfig
    from umm.fusion.settings import TrainingSettings

    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "tasks": ["synth-math"],
        "evolve": {"method": "ties", "budget": {"evaluations": 7}, "population": 3, "layer_granularity": 2},
        "fusion": {"data": "data.jsonl", "max_length": 64, "training": {"max_steps": 5, "lr": 2e-5}},
    }))
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.fusion.data == (tmp_path / "data.jsonl").resolve()  # relative to the file
    assert cfg.fusion.training == TrainingSettings(max_steps=5, lr=2e-5) and cfg.fusion.max_length == 64
    job = CombineJob(models=[tmp_path / "a", tmp_path / "b"], pivot=tmp_path / "a", tasks=["synth-math"],
                     search_size=8, test_size=None, device="cpu", seed=3, run_dir=tmp_path / "run",
                     settings=cfg.combine_settings())
    run = CombineJob.model_validate_json(job.model_dump_json()).combine_config()  # as the worker reads it
    assert isinstance(run, CombineConfig) and run.evolve.method == "ties" and run.evolve.budget.evaluations == 7
    assert (run.evolve.population, run.evolve.layer_granularity, run.seed) == (3, 2, 3)
    assert run.fusion.training == TrainingSettings(max_steps=5, lr=2e-5) and run.fusion.max_length == 64
    assert run.tasks[0].search_size == 8 and run.pivot == str(tmp_path / "a")
    defaults = CoordinatorConfig()  # the coordinator's own defaults where they differ from the library's
    assert defaults.evolve.budget.evaluations == 40 and defaults.fusion.max_length == 512
    assert defaults.fusion.data is None and defaults.fusion.training == TrainingSettings() and defaults.margin == 0


def test_state_db_records_and_versions(tmp_path):
    db = StateDB(tmp_path / "state.db")
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    n = db.start_round()
    assert n == 1 and db.unfinished_round() == 1
    db.begin_step(n, "discover")
    db.finish_step(n, "discover", DiscoverStep(experts=["a"]))
    with pytest.raises(TypeError, match="DiscoverStep"):  # each step has its result type
        db.finish_step(n, "fetch", DiscoverStep(experts=["a"]))
    db.begin_step(n, "fetch")
    # another connection (a restarted process) sees exactly what is finished, typed
    db2 = StateDB(tmp_path / "state.db")
    assert db2.step(n, "discover").status == "done" and db2.step(n, "discover").result == DiscoverStep(experts=["a"])
    assert db2.step(n, "fetch").status == "running" and db2.step(n, "fetch").result is None
    assert db2.round(n).phase == "fetch" and db2.latest_done_step("discover").round == n
    db2.record_fetch("h", "failed", "down")
    db2.record_fetch("h", "done")
    assert db2.fetch("h").attempts == 2 and db2.fetch("h").status == "done"
    db2.update_round(n, state="published", published=1, objective=0.5, scores={"t": 0.5}, sources=["x"])
    last = db.last_published_round()
    assert last.scores == {"t": 0.5} and last.sources == ["x"] and last.published is True
    assert db.unfinished_round() is None
    with pytest.raises(StateError, match="no settable column"):
        db.update_round(n, started_at=7.0)
    with sqlite3.connect(tmp_path / "state.db") as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(StateError, match="newer"):
        StateDB(tmp_path / "state.db")


def _c(h: str, arch: str, **scores: float) -> Candidate:
    return Candidate(h * 64, arch, "tok", scores)


def test_planner_groups_by_fingerprint():
    math, code, other = _c("a", "llama", math=0.9, code=0.1), _c("b", "llama", math=0.2, code=0.8), _c("c", "neox", math=0.1, code=0.9)
    assert plan_round([math]).kind == "none"
    p = plan_round([math, code])
    assert p.kind == "evolve" and p.stages == ("evolve",) and sorted(p.models) == ["a" * 64, "b" * 64]
    assert p.previous == "" and plan_round([math, code], previous="f" * 64).previous == "f" * 64
    p = plan_round([math, code, other])  # code's best is in another family: fused into the pivot's, then evolved
    assert p.kind == "combine" and p.stages == ("fuse", "evolve")
    assert p.best_per_domain == {"code": "c" * 64, "math": "a" * 64}
    assert p.pivot == "c" * 64 and p.sources == ["a" * 64]  # pivot: best model of the hardest domain (tie: code)
    # with the base's family named, the pivot is the best of the hardest domain its experts lead
    p = plan_round([math, code, other], family=("llama", "tok"))
    assert p.kind == "combine" and p.pivot == "a" * 64 and p.sources == ["c" * 64]
    # one expert best everywhere: merged with the best compatible partner
    p = plan_round([_c("a", "llama", math=0.9), _c("b", "llama", math=0.5), _c("d", "neox", math=0.7)])
    assert p.kind == "evolve" and p.pivot == "a" * 64 and p.sources == ["b" * 64]


def test_ranks_and_plan_break_score_ties_by_one_rule():
    """Equal scores: an expert declaring the domain first, then the smaller manifest hash; the plan
    merges exactly the rank-1 experts."""
    from dataclasses import replace

    from coordinator.planner import best_per_domain, rank_per_domain, score_order

    a, b, c = _c("a", "llama", math=0.5, code=0.2), _c("b", "llama", math=0.5, code=0.7), _c("c", "llama", code=0.7)
    ranked = rank_per_domain({x.manifest_hash: x.domain_scores for x in (c, b, a)})  # input order does not matter
    assert [h[0] for h, _ in ranked["math"]] == ["a", "b"] and [h[0] for h, _ in ranked["code"]] == ["b", "c", "a"]
    assert best_per_domain([c, b, a]) == {"math": "a" * 64, "code": "b" * 64}
    assert sorted(plan_round([c, b, a]).models) == ["a" * 64, "b" * 64]  # each domain's rank-1 expert
    # a declared domain wins a tie, and only a tie
    c_code = replace(c, declared=frozenset({"code"}))
    ranked = rank_per_domain({x.manifest_hash: x.domain_scores for x in (a, b, c_code)}, {"c" * 64: {"code"}})
    assert [h[0] for h, _ in ranked["code"]] == ["c", "b", "a"]
    assert best_per_domain([a, b, c_code]) == {"math": "a" * 64, "code": "c" * 64}
    a_code = replace(a, declared=frozenset({"code"}))
    assert best_per_domain([a_code, b]) == {"math": "a" * 64, "code": "b" * 64}  # 0.7 beats a declared 0.2
    # a higher score always wins, whatever the hashes
    assert sorted([(0.4, "0" * 64), (0.6, "f" * 64)], key=lambda x: score_order(*x))[0][1] == "f" * 64
    # a lone best expert takes the best-scoring compatible partner; a tie goes to the smaller hash
    p = plan_round([_c("a", "llama", math=0.9), _c("e", "llama", math=0.5), _c("d", "llama", math=0.5)])
    assert p.kind == "evolve" and p.models == ["d" * 64, "a" * 64]


def test_experts_that_all_score_zero_still_fuse_by_their_declared_domains():
    """Tiny models that score 0 everywhere: each domain's declaring expert is its best, so two
    families still give a combine plan (not a hash-dependent evolve or nothing)."""
    from dataclasses import replace

    zero = dict(math=0.0, code=0.0, list=0.0)
    experts = [replace(_c(h, arch, **zero), declared=frozenset({d}))
               for h, arch, d in (("b", "llama", "math"), ("c", "llama", "code"), ("a", "neox", "list"))]
    p = plan_round(experts)
    assert p.kind == "combine" and p.best_per_domain == {"math": "b" * 64, "code": "c" * 64, "list": "a" * 64}
    # pivot: the rank-1 expert of the hardest domain (equal means: the domain that sorts first, code)
    assert p.pivot == "c" * 64 and sorted(p.sources) == ["a" * 64, "b" * 64]
