"""Synthetic suites, tokenizers, recipes and fusion data of the tiny expert suite (no training)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from umm.errors import UmmError
from umm.eval.splits import generated_split_of
from umm.eval.suites import SUITES, get_suite, split_records, suite_for_domain
from umm.experts.instruction_data import instruction_records, write_instruction_data
from umm.experts.recipes import ModelRecipe, get_recipe, scaled
from umm.experts.tokenizers import train_tokenizer


def test_contract_names_kinds_and_domains() -> None:
    assert set(SUITES) == {"synth-math", "synth-code", "synth-list"}
    assert {s.domain: s.kind for s in SUITES.values()} == {"math": "gsm8k", "code": "mbpp", "list": "gsm8k"}
    assert get_suite("math") is SUITES["synth-math"] and suite_for_domain("code").name == "synth-code"
    with pytest.raises(UmmError, match="unknown synthetic suite"):
        get_suite("poetry")


@pytest.mark.parametrize("name", list(SUITES))
def test_generate_is_deterministic_distinct_and_seeded(name: str) -> None:
    s = SUITES[name]
    a, b, c = s.generate(300, 1), s.generate(300, 1), s.generate(300, 2)
    assert a == b
    assert a != c
    assert len({s.key(r) for r in a}) == 300


@pytest.mark.parametrize("name", list(SUITES))
def test_splits_are_disjoint_pure_and_prefix_stable(name: str) -> None:
    s = SUITES[name]
    recs = {sp: split_records(s, sp, 150) for sp in ("train", "search", "test")}
    keys = {sp: {s.key(r) for r in rs} for sp, rs in recs.items()}
    for sp, ks in keys.items():
        assert len(ks) == 150
        assert all(generated_split_of(k) == sp for k in ks)
    assert not keys["train"] & keys["search"] and not keys["train"] & keys["test"] and not keys["search"] & keys["test"]
    assert split_records(s, "test", 40) == recs["test"][:40]  # a bigger test set contains the smaller one
    assert split_records(s, "test", 40, seed=3) != recs["test"][:40]
    with pytest.raises(ValueError):
        split_records(s, "valid", 3)  # type: ignore[arg-type]


def test_math_answers_are_correct_worked_solutions() -> None:
    s = SUITES["synth-math"]
    two_step = 0
    for r in split_records(s, "train", 400):
        *steps, final = r["answer"].split("\n")
        assert re.fullmatch(r"#### \d+", final)
        for line in steps:  # every step is true arithmetic and the last result is the answer
            lhs, rhs = line.split(" = ")
            a, op, b = lhs.split()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(rhs)
        assert steps[-1].split(" = ")[1] == final[5:]
        numbers_in_q = [int(x) for x in re.findall(r"\d+", r["question"])]
        assert int(steps[0].split()[0]) == numbers_in_q[0]
        two_step += len(steps) == 2
        assert s.prompt(r).startswith("Question: ") and s.prompt(r).endswith("\nAnswer:")
        assert s.text(r) == s.prompt(r) + " " + r["answer"]
    assert two_step > 50


def test_list_answers_are_the_extreme_value() -> None:
    for r in split_records(SUITES["synth-list"], "search", 200):
        nums = [int(x) for x in re.findall(r"\d+", r["question"])]
        want = max(nums) if "largest" in r["question"] else min(nums)
        assert 3 <= len(nums) <= 4 and all(1 <= x <= 20 for x in nums)  # copyable by a ~1M-param model
        assert r["answer"] == f"#### {want}"


def _passes(code: str, tests: list[str]) -> bool:
    ns: dict = {}
    try:
        exec(code + "\n" + "\n".join(tests), ns)  # our own generated code, not model output
    except AssertionError:
        return False
    return True


def test_code_gold_solutions_pass_and_wrong_ones_fail() -> None:
    s = SUITES["synth-code"]
    recs = split_records(s, "test", 200)
    for r in recs:
        assert r["code"] == s.target(r) and s.prompt(r) == r["text"] + "\n"
        assert len(r["test_list"]) == 3 and all(t.startswith("assert ") for t in r["test_list"])
        assert _passes(r["code"], r["test_list"]), r
    # The code of another description (renamed to this function) fails: the asserts discriminate.
    def renamed(code: str, like: str) -> str:
        return re.sub(r"^def \w+", re.match(r"def \w+", like).group(0), code)

    same_arity = [(a, b) for a, b in zip(recs, recs[1:]) if a["code"].count(",") == b["code"].count(",")]
    wrong = sum(not _passes(renamed(a["code"], b["code"]), b["test_list"]) for a, b in same_arity)
    assert len(same_arity) > 50 and wrong > 0.8 * len(same_arity)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [s.text(r) for s in SUITES.values() for r in split_records(s, "train", 100)]


def test_tokenizers_round_trip_and_differ(corpus: list[str], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    byte = train_tokenizer("bytelevel", corpus, 320)
    meta = train_tokenizer("metaspace", corpus, 256)
    for tok, name in ((byte, "b"), (meta, "m")):
        tok.save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name)
        assert loaded.padding_side == "left" and loaded.eos_token == "</s>" and loaded.pad_token == "<pad>"
        for text in corpus[::50]:
            ids = loaded(text)["input_ids"]
            assert loaded.decode(ids) == text  # no special tokens added, lossless
        digits = loaded.convert_ids_to_tokens(loaded("x 2026")["input_ids"])
        assert [t for t in digits if any(c.isdigit() for c in t)] == ["2", "0", "2", "6"]
    assert any(t.startswith("Ġ") for t in byte.get_vocab()) and not any(t.startswith("▁") for t in byte.get_vocab())
    assert any(t.startswith("▁") for t in meta.get_vocab()) and not any(t.startswith("Ġ") for t in meta.get_vocab())
    assert byte(corpus[0])["input_ids"] != meta(corpus[0])["input_ids"]
    assert train_tokenizer("bytelevel", corpus, 320).get_vocab() == byte.get_vocab()  # deterministic
    with pytest.raises(ValueError):
        train_tokenizer("wordpiece", corpus, 100)  # type: ignore[arg-type]


def test_instruction_data_comes_from_train_only(tmp_path: Path) -> None:
    path = write_instruction_data(tmp_path / "fuse" / "data.jsonl", {"list": 30, "math": 20}, seed=0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 50 and [x["domain"] for x in lines[:4]] == ["list", "math", "list", "math"]
    for x in lines:
        s = suite_for_domain(x["domain"])
        assert set(x) == {"instruction", "response", "domain", "task"} and x["task"] == s.name
        key = x["instruction"].removeprefix("Question: ").removesuffix("\nAnswer:")
        assert generated_split_of(key) == "train"
    assert lines == instruction_records({"list": 30, "math": 20}, seed=0)
    assert not [p for p in path.parent.iterdir() if p.name != "data.jsonl"]  # no temp file left


def test_recipes_validate_fingerprint_and_scale() -> None:
    full, small = get_recipe("full"), get_recipe("small")
    for r in (full, small):
        r.validate()
        assert [m.name for m in r.models if m.role == "expert"] == ["math", "code", "list"]
        assert "base" in [m.name for m in r.models if m.role == "base"]
        assert r.model("math").init_from == "base" and r.model("code").init_from == "base"
        assert r.model("list").family != r.model("base").family and r.model("list").tokenizer != r.model("base").tokenizer
    assert full.fingerprint() != small.fingerprint() and full.fingerprint() == get_recipe("full").fingerprint()
    # The full base is a short anneal of a long pretraining: the experts are far shorter than both.
    assert full.model("base").init_from == "pretrain" and full.model("pretrain").prebuilt is not None
    pretraining = full.model("pretrain").train.steps + full.model("base").train.steps
    assert all(pretraining >= 5 * full.model(e).train.steps for e in ("math", "code"))
    bigger = scaled(small, steps=2.0)
    assert bigger.model("math").train.steps == 2 * small.model("math").train.steps
    assert bigger.fingerprint() != small.fingerprint()
    bad = replace(small, models=(*small.models[:1], replace(small.models[1], init_from="nope")))
    with pytest.raises(UmmError, match="starts from 'nope'"):
        bad.validate()
    mixed = replace(small, models=(small.models[0], replace(small.models[3], name="x", init_from="base")))
    with pytest.raises(UmmError, match="family and tokenizer"):
        mixed.validate()
    with pytest.raises(UmmError, match="unknown expert suite variant"):
        get_recipe("huge")
    # An expert may replay other domains; it is an expert only of the domains it names.
    math = replace(small.models[1], mixture={"math": 50, "code": 5}, experts_of=("math",))
    assert math.domains == ["math"] and small.models[0].domains == [] and small.models[2].domains == ["code"]
    for wrong in (("list",), ()):
        bad_experts = replace(small, models=(small.models[0], replace(math, experts_of=wrong)))
        with pytest.raises(UmmError, match="must be a non-empty part of its mixture"):
            bad_experts.validate()
    assert isinstance(small.models[0], ModelRecipe)


def test_every_recipe_mixture_has_enough_distinct_train_records() -> None:
    need: dict[str, int] = {}
    for variant in ("full", "small"):
        for m in get_recipe(variant).models:
            for domain, n in m.mixture.items():
                need[domain] = max(need.get(domain, 0), n)
    for domain, n in need.items():
        recs = split_records(suite_for_domain(domain), "train", n)
        assert len({suite_for_domain(domain).key(r) for r in recs}) == n


def test_fingerprint_covers_the_suites_version(monkeypatch) -> None:
    import umm.eval.suites as suites

    before = get_recipe("small").fingerprint()
    monkeypatch.setattr(suites, "SUITES_VERSION", suites.SUITES_VERSION + 1)
    assert get_recipe("small").fingerprint() != before
