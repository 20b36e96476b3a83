"""``umm fuse``: the whole pipeline on tiny random models, pivot choice, teacher reuse, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from umm.fusion.pipeline import choose_pivot_by_search, parse_config, run_teacher_passes

TASKS = ["synth-math", "synth-list"]


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    from umm.cli import fuse

    a = typer.Typer()
    fuse.register(a)

    @a.callback()
    def _root() -> None:  # keeps `fuse` a subcommand, as in the real app
        pass

    return a


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Path]:
    from umm.experts.instruction_data import instruction_records
    from umm.experts.random_models import make_random_neox

    root = tmp_path_factory.mktemp("fuse_cli")
    records = instruction_records({"list": 3, "math": 3})
    records.append({"instruction": "Repeat the list.", "response": " ".join(str(i) for i in range(300))})  # too long
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    llama = root / "a_llama"
    shutil.copytree(tiny_models["base"], llama)
    return {"root": root, "data": data, "llama": llama, "neox": make_random_neox(root / "b_neox", seed=3)}


def _config(s: dict[str, Path], out: str, **kw) -> dict:
    cfg = {
        "pivot": None, "sources": [str(s["llama"]), str(s["neox"])], "data": str(s["data"]),
        "output": str(s["root"] / out), "teacher_cache": str(s["root"] / "teachers"),
        "k": 4, "max_length": 160, "device": "cpu",
        "training": {"lr": 1e-3, "max_steps": 2, "batch_size": 2, "checkpoint_every": 1},
        "eval": {"tasks": TASKS, "search_limit": 2, "test_limit": 2, "batch_size": 4, "max_new_tokens": 4},
    }
    cfg.update(kw)
    return cfg


def _write(s: dict[str, Path], name: str, cfg: dict) -> Path:
    p = s["root"] / name
    p.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return p


def _run(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, ["fuse", *args], env={"COLUMNS": "250", "UMM_NO_PROGRESS": "1"})


def test_fuse_end_to_end_then_resume(app: typer.Typer, setup: dict[str, Path]) -> None:
    cfg = _write(setup, "e2e.yaml", _config(setup, "fused"))
    r = _run(app, str(cfg))
    assert r.exit_code == 0, r.output
    out = setup["root"] / "fused"
    report = json.loads((out / "fuse_report.json").read_text())
    # random models all score 0 on search: the tie goes to the first name (a_llama), scored on search
    assert Path(report["pivot"]).name == "a_llama"
    assert set(report["pivot_search_scores"]) == {str(setup["llama"]), str(setup["neox"])}
    assert [m["role"] for m in report["test"]] == ["pivot (before)", "fused", "source"]
    assert all(set(m["scores"]) == set(TASKS) and m["scores"]["synth-list"]["n"] == 2 for m in report["test"])
    # storage per token of each teacher pass, printed and recorded; the long response was truncated
    assert "bytes/token" in r.output
    assert {Path(t["path"]).name for t in report["teachers"]} == {"a_llama", "b_neox"}
    assert all(0 < t["bytes_per_token"] < t["dense_bytes_per_token"] for t in report["teachers"])
    assert all(t["n_truncated"] == 1 for t in report["teachers"])
    assert [t["layout"] for t in report["teachers"]] == ["plain", "plain"]  # auto, no chat templates
    assert "1 responses truncated" in r.output
    assert "pivot (before)" in r.output and "fused" in r.output
    recipe = json.loads((out / "fusion_recipe.json").read_text())
    assert recipe["steps"] == 2 and Path(recipe["sources"][0]).name == "b_neox"

    again = _run(app, str(cfg))  # not resuming: refuses to touch the finished output
    assert again.exit_code == 2 and "exists and is not empty" in again.output
    resumed = _run(app, str(cfg), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "already holds the finished fused model" in resumed.output
    assert (out / "fusion_recipe.json").read_text() == json.dumps(recipe, indent=1)


def test_pivot_is_best_on_hardest_domain_of_search_split(setup: dict[str, Path]) -> None:
    calls: list[tuple[str, str]] = []
    table = {"m": {"synth-math": 0.4, "synth-list": 0.9}, "c": {"synth-math": 0.1, "synth-list": 0.95},
             "z": {"synth-math": 0.2, "synth-list": 0.99}}

    def scorer(path: Path, tasks, split, limit):
        calls.append((path.name, split))
        return {t: (table[path.name][t], 0.0, 1.0, limit) for t in tasks}

    base = _config(setup, "unused", sources=["m", "c", "z"])
    cfg = parse_config(base)
    pivot, scores, domain = choose_pivot_by_search(cfg, scorer, lambda *a, **k: None)
    assert domain == "math" and pivot.name == "m"  # math is hardest; m is best there, not best overall
    assert {s for _, s in calls} == {"search"} and len(calls) == 3
    pivot, _, domain = choose_pivot_by_search(parse_config({**base, "pivot_domain": "list"}), scorer,
                                              lambda *a, **k: None)
    assert (pivot.name, domain) == ("z", "list")


def test_adding_a_source_does_not_redo_existing_teacher_passes(setup: dict[str, Path], tmp_path: Path) -> None:
    from umm.experts.random_models import make_random_neox
    from umm.fusion.data import InstructionData

    cfg = parse_config(_config(setup, "unused", teacher_cache=str(tmp_path / "cache")))
    data = InstructionData.from_jsonl(setup["data"])
    first = run_teacher_passes(cfg, setup["llama"], [setup["neox"]], data, "cpu", show_progress=False)
    stamps = {p: p.stat().st_mtime_ns for t in first for p in Path(t.directory).iterdir()}
    extra = make_random_neox(tmp_path / "c_neox", seed=9)
    second = run_teacher_passes(cfg, setup["llama"], [setup["neox"], extra], data, "cpu", show_progress=False)
    assert [t.directory for t in second[:2]] == [t.directory for t in first]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing rewritten
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_source_tokenizer_needing_remote_code_is_refused(app: typer.Typer, setup: dict[str, Path]) -> None:
    bad = setup["root"] / "remote_tok"
    shutil.copytree(setup["neox"], bad, dirs_exist_ok=True)
    cfg_path = bad / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tok.MyTok", None]}
    cfg_path.write_text(json.dumps(tok_cfg))
    r = _run(app, str(_write(setup, "remote.yaml", _config(setup, "o_remote", pivot=str(setup["llama"]),
                                                              sources=[str(bad)]))))
    assert r.exit_code == 2
    assert "source" in r.output and "remote_tok" in r.output and "custom code" in r.output
    assert not (setup["root"] / "o_remote").exists()


def test_malformed_data_line_is_named(app: typer.Typer, setup: dict[str, Path]) -> None:
    data = setup["root"] / "bad.jsonl"
    lines = setup["data"].read_text().splitlines()
    data.write_text("\n".join([lines[0], lines[1], "{not json", lines[2]]) + "\n")
    r = _run(app, str(_write(setup, "bad_data.yaml", _config(setup, "o_bad", data=str(data)))))
    assert r.exit_code == 2 and "bad.jsonl:3" in r.output and "not valid JSON" in r.output
    empty = setup["root"] / "empty_line.jsonl"
    empty.write_text(lines[0] + "\n\n" + lines[1] + "\n")
    r = _run(app, str(_write(setup, "empty.yaml", _config(setup, "o_empty", data=str(empty)))))
    assert r.exit_code == 2 and "empty_line.jsonl:2" in r.output and "empty line" in r.output


def test_layout_reaches_the_teacher_passes(setup: dict[str, Path], tmp_path: Path) -> None:
    from umm.fusion.data import InstructionData
    from umm.fusion.pipeline import train_config

    data = InstructionData.from_jsonl(setup["data"])
    cache = str(tmp_path / "cache")
    runs = {}
    for layout in ("auto", "raw"):
        cfg = parse_config(_config(setup, "unused", teacher_cache=cache, layout=layout))
        runs[layout] = run_teacher_passes(cfg, setup["llama"], [setup["neox"]], data, "cpu", show_progress=False)
        assert train_config(cfg, setup["llama"], [setup["neox"]], "cpu", False).layout == layout
    assert [t.layout for t in runs["auto"]] == ["plain", "plain"] and [t.layout for t in runs["raw"]] == ["raw", "raw"]
    assert {t.directory for t in runs["auto"]}.isdisjoint(t.directory for t in runs["raw"])  # new cache keys
    assert len(list((tmp_path / "cache").iterdir())) == 4


def test_chat_layout_without_template_is_refused_before_any_work(app: typer.Typer, setup: dict[str, Path]) -> None:
    r = _run(app, str(_write(setup, "chat.yaml", _config(setup, "o_chat", pivot=str(setup["llama"]),
                                                          sources=[str(setup["neox"])], layout="chat"))))
    assert r.exit_code == 2, r.output
    assert "pivot" in r.output and "a_llama" in r.output and "needs a chat template" in r.output
    assert not (setup["root"] / "o_chat").exists()
    r = _run(app, str(_write(setup, "alpaca.yaml", _config(setup, "o_chat", layout="alpaca"))))
    assert r.exit_code == 2 and "layout" in r.output and "'raw'" in r.output


def test_auto_layout_that_differs_between_models_is_reported(setup: dict[str, Path], tmp_path: Path) -> None:
    from umm.checkpoints.loading import load_tokenizer
    from umm.fusion.pipeline import FuseEvents, run_fuse

    chatty = tmp_path / "chat_neox"
    shutil.copytree(setup["neox"], chatty)
    tok = load_tokenizer(chatty)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}" \
                       "{% if add_generation_prompt %}<assistant>{% endif %}"
    tok.save_pretrained(chatty)
    cfg = parse_config(_config(setup, "unused", pivot=str(setup["llama"]), sources=[str(chatty)],
                               output=str(tmp_path / "out"), teacher_cache=str(tmp_path / "cache"),
                               final_eval=False, training={"lr": 1e-3, "max_steps": 1, "batch_size": 4}))
    class Warnings(FuseEvents):
        def __init__(self) -> None:
            self.said: list[str] = []

        def warning(self, text: str) -> None:
            self.said.append(text)

    events = Warnings()
    result = run_fuse(cfg, show_progress=False, events=events, scorer=lambda *a: {})
    assert [t.layout for t in result.teachers] == ["plain", "chat"]
    assert any("different prompt layouts" in m and "chat_neox: chat" in m for m in events.said)


def test_pivot_that_is_not_a_causal_lm_is_refused(app: typer.Typer, setup: dict[str, Path]) -> None:
    clf = setup["root"] / "classifier"
    shutil.copytree(setup["llama"], clf, dirs_exist_ok=True)
    conf = json.loads((clf / "config.json").read_text())
    conf["architectures"] = ["LlamaForSequenceClassification"]
    (clf / "config.json").write_text(json.dumps(conf))
    r = _run(app, str(_write(setup, "clf.yaml", _config(setup, "o_clf", pivot=str(clf), sources=[str(setup["neox"])]))))
    assert r.exit_code == 2 and "pivot" in r.output and "not a causal LM" in r.output


def test_config_errors_are_explained(app: typer.Typer, setup: dict[str, Path]) -> None:
    r = _run(app, str(_write(setup, "typo.yaml", _config(setup, "o_typo", lamda=0.5))))
    assert r.exit_code == 2 and "unknown key 'lamda'" in r.output and "lam" in r.output
    r = _run(app, str(_write(setup, "typo2.yaml", _config(setup, "o_typo", training={"learning_rate": 1}))))
    assert r.exit_code == 2 and "training.learning_rate" in r.output and "lr" in r.output
    r = _run(app, str(_write(setup, "one.yaml", _config(setup, "o_one", sources=[str(setup["llama"])]))))
    assert r.exit_code == 2 and "at least two models" in r.output
    r = _run(app, str(setup["root"] / "missing.yaml"))
    assert r.exit_code == 2 and "config file not found" in r.output


def test_example_config_is_valid_and_sets_every_key() -> None:
    from umm.fusion.pipeline import EvalSettings, FuseConfig, TrainingSettings, load_config

    path = Path(__file__).resolve().parent.parent / "examples" / "fuse.yaml"
    cfg = load_config(path, device="cpu")
    assert cfg.device == "cpu" and cfg.k == 10 and cfg.lam == 0.9 and cfg.output == Path.cwd() / "fused-math-list"  # outputs: under the cwd, never in examples/
    assert cfg.layout == "raw"  # the tiny experts were trained on bare prompts
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == set(FuseConfig.model_fields)
    assert set(raw["training"]) == set(TrainingSettings.model_fields)
    assert set(raw["eval"]) == set(EvalSettings.model_fields)
