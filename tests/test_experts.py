"""The tiny trained expert suite: build, layout, loading, learning, determinism, caching, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from experts_fixtures import small_suite  # noqa: F401  (session fixture)
from typer.testing import CliRunner

from umm.cli import app
from umm.eval.suites import SUITES, split_records
from umm.experts import build as build_mod
from umm.experts.build import SuiteNotBuiltError, build_suite, ensure_suite, is_current, load_suite
from umm.experts.recipes import get_recipe, scaled
from umm.experts.train import IGNORE, collate, encode_pairs

runner = CliRunner()


def _weights_digest(folder: Path) -> str:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()


def _target_loss(model, tok, domain: str, n: int = 48) -> float:
    """Mean target-token loss on ``n`` test records of ``domain`` (teacher forcing, one batch)."""
    suite = next(s for s in SUITES.values() if s.domain == domain)
    ex = encode_pairs(tok, [(suite.prompt(r), suite.target(r)) for r in split_records(suite, "test", n)])
    batch = collate(ex, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
    ))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_suite_layout_and_loading(small_suite) -> None:  # noqa: F811
    info = json.loads((small_suite.root / "suite.json").read_text())
    assert info["variant"] == "small" and info["recipe_fingerprint"] == get_recipe("small").fingerprint()
    assert info["bases"] == {"llama": "base"}
    assert {d: v["task"] for d, v in info["domains"].items()} == {"math": "synth-math", "code": "synth-code", "list": "synth-list"}
    assert {d: v["experts"] for d, v in info["domains"].items()} == {"math": ["math"], "code": ["code"], "list": ["list"]}
    assert small_suite.expert_for("code") == "code" and small_suite.base_of("math") == "base"
    assert small_suite.base_of("list") is None
    for name in ("base", "math", "code", "list"):
        folder = small_suite.path(name)
        names = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
        assert not [n for n in names if n.endswith((".bin", ".pt", ".pkl"))]
    base, btok = small_suite.load("base")
    lst, ltok = small_suite.load("list")
    assert type(base).__name__ == "LlamaForCausalLM" and type(lst).__name__ == "GPTNeoXForCausalLM"
    assert btok.get_vocab() != ltok.get_vocab()
    assert sum(p.numel() for p in base.parameters()) == small_suite.models["base"]["params"]
    # Generation runs and stops: greedy, prompt in the suite's own format.
    prompt = SUITES["synth-list"].prompt(split_records(SUITES["synth-list"], "test", 1)[0])
    enc = ltok([prompt], return_tensors="pt")
    out = lst.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 8
    with pytest.raises(Exception, match="no model 'poet'"):
        small_suite.path("poet")


def test_experts_are_mergeable_task_vectors_of_the_base(small_suite) -> None:  # noqa: F811
    from safetensors.torch import load_file

    base = load_file(small_suite.path("base") / "model.safetensors")
    for name in ("math", "code"):
        expert = load_file(small_suite.path(name) / "model.safetensors")
        assert expert.keys() == base.keys()
        assert all(expert[k].shape == base[k].shape for k in base)
        assert json.loads((small_suite.path(name) / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
        delta = sum(float((expert[k] - base[k]).norm()) for k in base)
        assert delta > 0  # a real task vector ...
        rel = delta / sum(float(base[k].norm()) for k in base)
        assert rel < 0.5  # ... that does not wipe out the base (moderate fine-tuning)
    assert (small_suite.path("math") / "tokenizer.json").read_bytes() == (small_suite.path("base") / "tokenizer.json").read_bytes()


def test_each_expert_fits_its_own_domain_better_than_the_base(small_suite) -> None:  # noqa: F811
    base, tok = small_suite.load("base")
    for name in ("math", "code"):
        expert, _ = small_suite.load(name)
        assert _target_loss(expert, tok, name) < _target_loss(base, tok, name) - 0.05, name
    lst, ltok = small_suite.load("list")
    math_model, _ = small_suite.load("math")
    # The heterogeneous expert knows its domain; the math expert (a fusion pivot) barely does.
    assert _target_loss(lst, ltok, "list") < 0.9 * _target_loss(math_model, tok, "list")


def test_cached_suite_is_reused_and_stale_one_detected(small_suite, monkeypatch) -> None:  # noqa: F811
    root = small_suite.root.parent
    monkeypatch.setattr(build_mod, "build_suite", lambda *a, **k: pytest.fail("rebuilt an up-to-date suite"))
    again = ensure_suite("small", root)
    assert again.info == small_suite.info and is_current(again)
    assert not is_current(again, scaled(get_recipe("small"), steps=2.0, variant="small"))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folders left behind
    with pytest.raises(SuiteNotBuiltError, match="umm experts prepare --variant full"):
        load_suite("full", root)


def test_training_is_deterministic_and_failed_build_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    tiny = scaled(get_recipe("small"), steps=0.15, data=0.3, variant="tiny")
    a = build_suite(tiny, tmp_path / "a")
    b = build_suite(tiny, tmp_path / "b")
    for name in ("base", "math", "code", "list"):
        assert _weights_digest(a.path(name)) == _weights_digest(b.path(name)), name
        assert a.models[name]["final_loss"] == b.models[name]["final_loss"]
    assert _weights_digest(a.path("math")) != _weights_digest(a.path("base"))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("umm.experts.train.train_causal_lm", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_suite(tiny, tmp_path / "c")
    assert not (tmp_path / "c" / "tiny").exists() and list((tmp_path / "c").iterdir()) == []
    with pytest.raises(RuntimeError):
        build_suite(tiny, tmp_path / "a")  # a failed rebuild keeps the old suite
    assert _weights_digest(a.path("math")) == _weights_digest(tmp_path / "a" / "tiny" / "math")


def test_training_pieces() -> None:
    class Tok:
        eos_token_id = 9

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    (ex,) = encode_pairs(Tok(), [("ab", "c")])
    assert ex.input_ids == (97, 98, 99, 9) and ex.labels == (IGNORE, IGNORE, 99, 9)
    with pytest.raises(ValueError, match="max_length"):
        encode_pairs(Tok(), [("a" * 10, "b")], max_length=8)
    (doc,) = encode_pairs(Tok(), [("", "a" * 10)], max_length=8)  # a document keeps its first tokens
    assert doc.input_ids == (97,) * 8 and doc.labels == doc.input_ids


def test_cli_list_and_prepare(small_suite, tmp_path: Path) -> None:  # noqa: F811
    root = str(small_suite.root.parent)
    r = runner.invoke(app, ["experts", "list", "--dir", root])
    assert r.exit_code == 0, r.output
    assert "small: up to date" in r.output and "full: not built" in r.output
    assert "gptneox" in r.output and "llama" in r.output and "list" in r.output
    r = runner.invoke(app, ["experts", "prepare", "--variant", "small", "--dir", root])
    assert r.exit_code == 0, r.output
    assert "cached, up to date" in r.output and "math" in r.output
    r = runner.invoke(app, ["experts", "prepare", "--variant", "huge", "--dir", str(tmp_path)])
    assert r.exit_code == 2 and "unknown expert suite variant 'huge'" in r.output
    assert not list(tmp_path.iterdir())


def test_saving_a_model_shows_no_transformers_bar_and_restores_the_setting(tmp_path: Path, capfd) -> None:
    from transformers.utils import logging as hf_logging

    from umm.experts.random_models import make_random_llama

    hf_logging.enable_progress_bar()
    make_random_llama(tmp_path / "m", hidden_size=32, num_layers=1, num_heads=2, vocab_size=128)
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
