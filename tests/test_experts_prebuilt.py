"""Pretraining documents, prebuilt stages (a committed base) and what suite.json records."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from umm.cli import app
from umm.errors import UmmError
from umm.eval.splits import generated_split_of
from umm.experts.build import build_stage, build_suite, task_vector_stats
from umm.experts.corpus import KINDS, MAX_OPERAND, documents
from umm.experts.prebuilt import (
    PREBUILT_FILE,
    PrebuiltCorruptError,
    load_prebuilt,
    stage_fingerprint,
)
from umm.experts.recipes import get_recipe, scaled

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def test_documents_are_deterministic_and_see_only_train_items() -> None:
    counts = {k: 40 for k in KINDS}
    docs = documents(counts, seed=3)
    assert docs == documents(counts, seed=3) and docs != documents(counts, seed=4)
    assert len(docs) == 40 * len(KINDS)
    questions = descriptions = equations = 0
    for doc in docs:
        for line in doc.split("\n"):
            if m := re.fullmatch(r"(\d+) ([+-]) (\d+)(?: - (\d+))? = (\d+)", line):
                a, op, b, c, want = m.groups()
                got = int(a) + int(b) if op == "+" else int(a) - int(b)
                assert got - int(c or 0) == int(want) and max(int(a), int(b)) <= MAX_OPERAND, line
                equations += 1
            elif line.startswith("Write a function"):
                assert generated_split_of(line) == "train", line  # a code item's key is its description
                descriptions += 1
            elif line.endswith("?"):
                assert generated_split_of(line) == "train", line  # a math item's key is its question
                questions += 1
    assert equations and questions and descriptions
    # No document is a prompt with its answer: the base sees the primitives, not the items.
    assert not any("####" in d or "Answer:" in d for d in docs)
    with pytest.raises(UmmError, match="unknown pretraining document kind"):
        documents({"poems": 3})


def _tiny_recipe(prebuilt: str | None = "base-tiny"):
    recipe = scaled(get_recipe("small"), steps=0.15, data=0.3, variant="tiny")
    # The base pretrains on documents with the loss on every token, as the full suite's does.
    pretrain = dict(prebuilt=prebuilt, documents={"equations": 20, "code-defs": 10, "repeat": 10}, loss="text")
    models = tuple(replace(m, **pretrain) if m.name == "base" else m for m in recipe.models)
    return replace(recipe, models=models, score_items=4)


def test_a_prebuilt_base_is_checked_then_used_and_a_changed_recipe_trains_it(tmp_path: Path) -> None:
    recipe = _tiny_recipe()
    folder = build_stage(recipe, "base", prebuilt_root=tmp_path / "pre")
    assert folder == tmp_path / "pre" / "base-tiny"
    info = json.loads((folder / PREBUILT_FILE).read_text())
    assert info["fingerprint"] == stage_fingerprint(recipe, "base") and "model.safetensors" in info["files"]
    suite = build_suite(recipe, tmp_path / "suites", prebuilt_root=tmp_path / "pre")
    assert suite.models["base"]["prebuilt"] and not suite.models["math"]["prebuilt"]
    assert (suite.path("base") / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert (suite.path("math") / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()

    # The name of the prebuilt folder is not part of what trains it; the steps are.
    renamed = _tiny_recipe("elsewhere")
    assert stage_fingerprint(renamed, "base") == stage_fingerprint(recipe, "base")
    longer = replace(recipe, models=tuple(
        replace(m, train=replace(m.train, steps=m.train.steps + 1)) if m.name == "base" else m for m in recipe.models
    ))
    assert load_prebuilt(longer, "base", tmp_path / "pre") is None  # stale: trained instead
    again = build_suite(longer, tmp_path / "again", prebuilt_root=tmp_path / "pre")
    assert not again.models["base"]["prebuilt"] and again.models["base"]["steps"] == recipe.model("base").train.steps + 1

    weights = folder / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    with pytest.raises(PrebuiltCorruptError, match="sha256 differs"):
        build_suite(recipe, tmp_path / "bad", prebuilt_root=tmp_path / "pre")
    assert not (tmp_path / "bad" / "tiny").exists()


def test_suite_json_records_search_scores_and_task_vectors(tmp_path: Path) -> None:
    recipe = _tiny_recipe(prebuilt=None)
    suite = build_suite(recipe, tmp_path)
    scores = suite.info["search_scores"]
    assert scores["split"] == "search" and scores["n"] == 4
    assert set(scores["models"]) == {"base", "math", "code", "list"}
    assert all(set(s) == {"synth-math", "synth-code", "synth-list"} for s in scores["models"].values())
    vectors = suite.info["task_vectors"]
    assert set(vectors["relative_norm"]) == {"math", "code"}  # the list expert has no base
    r = vectors["relative_norm"]["math"]
    assert 0 < r["min"] <= r["mean"] <= r["max"]
    assert set(vectors["cosine"]) == {"code~math"} and -1 <= vectors["cosine"]["code~math"] <= 1


def test_task_vector_stats_against_a_hand_computation() -> None:
    base, a, b = (torch.nn.Linear(2, 2, bias=False) for _ in range(3))
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        a.weight.copy_(base.weight + torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        b.weight.copy_(base.weight + torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    stats = task_vector_stats({"base": base, "a": a, "b": b}, {"a": "base", "b": "base"})
    assert stats["relative_norm"]["a"] == {"min": 0.2, "mean": 0.2, "max": 0.2}  # 1 / 5
    assert stats["relative_norm"]["b"]["mean"] == pytest.approx(2 ** 0.5 / 5, abs=1e-4)
    assert stats["cosine"]["a~b"] == pytest.approx(1 / 2 ** 0.5, abs=1e-4)


def test_cli_stage_needs_a_prebuilt_name_or_out(tmp_path: Path) -> None:
    r = runner.invoke(app, ["experts", "prepare", "--variant", "small", "--stage", "math"])
    assert r.exit_code == 2 and "names no prebuilt folder" in r.output
    r = runner.invoke(app, ["experts", "prepare", "--variant", "small", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "--out goes with --stage" in r.output


def test_the_shipped_full_suite_pretraining_checks_out_against_its_recipe() -> None:
    """The committed base was built from today's ``full`` recipe and is byte for byte what it records.

    A change to the recipe, the data generators or the corpus makes this fail: rebuild the folder
    with ``umm experts prepare --variant full --stage pretrain`` and commit it.
    """
    recipe = get_recipe("full")
    shipped = [m.name for m in recipe.models if m.prebuilt is not None]
    assert shipped, "the full suite ships no prebuilt model"
    for name in shipped:
        assert load_prebuilt(recipe, name) is not None, f"the shipped prebuilt {name} is from another recipe"
