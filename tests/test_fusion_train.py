"""Training the pivot: a heterogeneous 2-step fusion, exact resume, output folder, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from umm.errors import UmmError
from umm.fusion.train import FusionTrainConfig, latest_checkpoint, prepare_targets, train_pivot

RECORDS = [
    {"instruction": f"Compute {i} + {i + 2}.", "response": f"The answer is {i} + {i + 2} = {2 * i + 2}. #### {2 * i + 2}"}
    for i in range(6)
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]) -> dict[str, Path]:
    from umm.experts.random_models import make_random_neox

    root = tmp_path_factory.mktemp("fusion_train")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    return {"root": root, "data": data, "pivot": tiny_models["base"],
            "neox": make_random_neox(root / "neox", seed=5)}


def _config(s: dict[str, Path], out: str, **kw) -> FusionTrainConfig:
    base = dict(pivot=s["pivot"], sources=[s["neox"]], data=s["data"], output=s["root"] / out,
                teacher_cache=s["root"] / "teachers", k=4, max_length=64, lr=1e-3, batch_size=2,
                grad_accum=1, max_steps=2, checkpoint_every=1, warmup_ratio=0.5, seed=7, device="cpu")
    base.update(kw)
    return FusionTrainConfig(**base)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_two_steps_then_resume_equals_uninterrupted(setup: dict[str, Path]) -> None:
    from umm.checkpoints.loading import load_causal_lm

    full = train_pivot(_config(setup, "full"), show_progress=False)
    card = (full / "README.md").read_text()
    assert str(setup["neox"]) in card and str(setup["data"]) in card and "lambda = 0.9" in card
    recipe = json.loads((full / "fusion_recipe.json").read_text())
    assert recipe["steps"] == 2 and recipe["fusion"] == "minCE" and len(recipe["teachers"]) == 2
    assert (recipe["layout"], recipe["pivot_layout"]) == ("auto", "plain")  # no template: plain
    assert [t["layout"] for t in recipe["teachers"]] == ["plain", "plain"] and "Prompt layout: `plain`" in card
    assert 0 <= recipe["fallback_fraction"]["neox"] < 1
    assert load_causal_lm(full) is not None  # a normal model folder
    trained, start = _weights(full), _weights(setup["pivot"])
    assert any(not torch.equal(trained[n], start[n]) for n in start)
    assert not (setup["root"] / ".full.work").exists()  # checkpoints cleaned after success

    targets, _ = prepare_targets(_config(setup, "cut"), show_progress=False)
    cfg = _config(setup, "cut")
    work = train_pivot(cfg, targets=targets, stop_after=1, show_progress=False)
    assert not cfg.output.exists() and latest_checkpoint(work) is not None
    with pytest.raises(UmmError, match="pass resume"):
        train_pivot(cfg, targets=targets, show_progress=False)
    with pytest.raises(UmmError, match="other training settings"):
        train_pivot(_config(setup, "cut", lr=5e-4, resume=True), targets=targets, show_progress=False)
    out = train_pivot(_config(setup, "cut", resume=True), targets=targets, show_progress=False)
    resumed = _weights(out)
    assert resumed.keys() == trained.keys()
    for name in trained:
        assert torch.equal(resumed[name], trained[name]), name


def test_refuses_non_causal_pivot_and_existing_output(setup: dict[str, Path]) -> None:
    bad = setup["root"] / "classifier"
    shutil.copytree(setup["pivot"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UmmError, match="not a causal LM"):
        train_pivot(_config(setup, "x", pivot=bad), show_progress=False)
    taken = setup["root"] / "taken"
    taken.mkdir()
    (taken / "file").write_text("x")
    with pytest.raises(UmmError, match="not empty"):
        train_pivot(_config(setup, "taken"), show_progress=False)


def test_targets_stats_avgce_and_incremental_sources(setup: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "teachers"
    alone, _ = prepare_targets(_config(setup, "a", sources=[], teacher_cache=cache), show_progress=False)
    (pivot_dir,) = list(cache.iterdir())
    index_before = (pivot_dir / "index.json").stat().st_mtime_ns
    targets, teachers = prepare_targets(
        _config(setup, "b", teacher_cache=cache, fusion="avgCE", vocab_map="stats"), show_progress=False)
    assert len(list(cache.iterdir())) == 2  # the new source added one pass...
    assert (pivot_dir / "index.json").stat().st_mtime_ns == index_before  # ...the pivot's was reused
    assert targets.vocab_maps[0] is None and targets.vocab_maps[1]["stats"] > 0
    for solo, fused in zip(alone.items, targets.items):
        assert solo is not None and fused is not None
        assert fused.input_ids == solo.input_ids
        n_resp = len(fused.input_ids) - fused.n_prompt
        assert fused.target.length == n_resp
        assert torch.allclose(fused.target.probs().sum(1), torch.ones(n_resp), atol=1e-5)
        assert fused.target.width > solo.target.width  # AvgCE mixes in the source's entries


def test_raw_layout_flows_into_targets_and_training_hash(setup: dict[str, Path], tmp_path: Path) -> None:
    from umm.checkpoints.loading import load_tokenizer

    cache = tmp_path / "teachers"
    cfg = _config(setup, "raw", teacher_cache=cache, layout="raw")
    assert cfg.training_hash() != _config(setup, "raw", teacher_cache=cache).training_hash()  # resume guard
    targets, teachers = prepare_targets(cfg, show_progress=False)
    assert [t.layout for t in teachers] == ["raw", "raw"]
    tok = load_tokenizer(setup["pivot"])
    for rec, item in zip(RECORDS, targets.items):
        assert item is not None
        prompt = tok(rec["instruction"])["input_ids"]
        assert item.n_prompt == len(prompt)
        assert item.input_ids == prompt + tok(rec["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert item.target.length == len(item.input_ids) - item.n_prompt  # targets on response tokens only
    with pytest.raises(UmmError, match="needs a chat template"):
        prepare_targets(_config(setup, "chat", teacher_cache=cache, layout="chat"), show_progress=False)
