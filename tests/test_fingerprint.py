"""Fingerprints: stable across re-saves, different when layout or vocabulary differ."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from umm.checkpoints import (
    Checkpoint,
    IncompatibleCheckpointsError,
    architecture_fingerprint,
    fingerprint,
    incompatibility,
    require_compatible,
    tokenizer_fingerprint,
)
from umm.experts.random_models import make_random_llama, make_tokenizer


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same seeded model saved sharded and in bf16, plus a narrower model (read-only)."""
    root = tmp_path_factory.mktemp("variants")
    return {
        "sharded": make_random_llama(root / "sharded", seed=0, max_shard_size="40KB"),
        "bf16": make_random_llama(root / "bf16", seed=0, dtype=torch.bfloat16),
        "narrow": make_random_llama(root / "narrow", seed=0, hidden_size=32),
    }


def test_stable_across_resave_and_sharding(tiny_models: dict[str, Path], variants: dict[str, Path]) -> None:
    with Checkpoint.open(tiny_models["base"]) as single, Checkpoint.open(variants["sharded"]) as sharded:
        assert len(sharded.weight_files) > 1 and len(single.weight_files) == 1
        fa, fb = fingerprint(single), fingerprint(sharded)
        assert fa == fb
        assert len(fa.architecture) == 64 and fa.model_type == "llama"
        assert fa.num_parameters == single.num_parameters
        assert incompatibility(single, sharded) is None
    # Experts (base + noise) share the base's layout and tokenizer: same fingerprint, other weights.
    with Checkpoint.open(tiny_models["math"]) as math:
        assert fingerprint(math) == fa


def test_shape_change_alters_fingerprint_and_is_named(tiny_models: dict[str, Path], variants: dict[str, Path]) -> None:
    base, narrow = tiny_models["base"], variants["narrow"]
    with Checkpoint.open(base) as a, Checkpoint.open(narrow) as b:
        assert architecture_fingerprint(a) != architecture_fingerprint(b)
        reason = incompatibility(a, b)
        first = a.tensor_names[0]
        assert reason is not None
        assert f"'{first}'" in reason
        assert str(tuple(a.tensors[first].shape)) in reason and str(tuple(b.tensors[first].shape)) in reason
        assert str(base) in reason and str(narrow) in reason
        with pytest.raises(IncompatibleCheckpointsError, match="cannot merge"):
            require_compatible([a, b])


def test_dtype_changes_fingerprint_but_not_compatibility(tiny_models: dict[str, Path], variants: dict[str, Path]) -> None:
    with Checkpoint.open(tiny_models["base"]) as a, Checkpoint.open(variants["bf16"]) as b:
        assert architecture_fingerprint(a) != architecture_fingerprint(b)
        assert incompatibility(a, b) is None


def test_missing_tensor_and_model_type(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_models["base"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint.open(tiny_models["base"]) as a, Checkpoint.open(folder) as b:
        reason = incompatibility(a, b)
        assert reason is not None and "'model.norm.weight'" in reason and "missing from" in reason
        assert str(folder) in reason
        reason_ba = incompatibility(b, a)
        assert reason_ba is not None and "'model.norm.weight'" in reason_ba
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(config))
    with Checkpoint.open(tiny_models["base"]) as a, Checkpoint.open(folder) as b:
        assert "model types differ" in (incompatibility(a, b) or "")


def test_tokenizer_difference_points_to_fusion(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "other_vocab"
    shutil.copytree(tiny_models["base"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    make_tokenizer(384, corpus="completely different text: lorem ipsum dolor sit amet " * 3).save_pretrained(folder)
    assert tokenizer_fingerprint(folder) != tokenizer_fingerprint(tiny_models["base"])
    with Checkpoint.open(tiny_models["base"]) as a, Checkpoint.open(folder) as b:
        assert architecture_fingerprint(a) == architecture_fingerprint(b)
        reason = incompatibility(a, b)
        assert reason is not None and "tokenizers differ" in reason and "umm fuse" in reason
        with pytest.raises(IncompatibleCheckpointsError, match="heterogeneous"):
            require_compatible([a, b])


def test_tokenizer_fingerprint_sources_agree(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The same vocabulary hashes the same from tokenizer.json or vocab.json + added_tokens.json."""
    data = json.loads((tiny_models["base"] / "tokenizer.json").read_text())
    folder = tmp_path / "slow"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(data["model"]["vocab"]))
    (folder / "added_tokens.json").write_text(json.dumps({t["content"]: t["id"] for t in data["added_tokens"]}))
    assert tokenizer_fingerprint(folder) == tokenizer_fingerprint(tiny_models["base"])
    # One id changed: a different vocabulary.
    vocab = dict(data["model"]["vocab"])
    a, b = list(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    assert tokenizer_fingerprint(folder) != tokenizer_fingerprint(tiny_models["base"])


def test_no_tokenizer_gives_none_and_sentencepiece_is_hashed(tmp_path: Path) -> None:
    assert tokenizer_fingerprint(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    h1 = tokenizer_fingerprint(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05world")
    assert h1 is not None and tokenizer_fingerprint(tmp_path) not in (None, h1)


def test_experts_of_one_base_are_compatible(tiny_models: dict[str, Path]) -> None:
    ckpts = [Checkpoint.open(tiny_models[k]) for k in ("base", "math", "code")]
    try:
        require_compatible(ckpts)
    finally:
        for c in ckpts:
            c.close()


def test_a_different_vocabulary_is_named_before_the_shapes_it_changes(tiny_models: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    """A merge of models with different vocabularies (e.g. a recipe asking ``tokenizer_source:
    union``) says that the tokenizers differ, not that ``lm_head.weight`` has another shape."""
    folder = make_random_llama(tmp_path / "bigger_vocab", vocab_size=512)
    make_tokenizer(512, corpus="completely different text: lorem ipsum dolor sit amet " * 3).save_pretrained(folder)
    with Checkpoint.open(tiny_models["base"]) as a, Checkpoint.open(folder) as b:
        assert a.tensors["lm_head.weight"].shape != b.tensors["lm_head.weight"].shape
        reason = incompatibility(a, b) or ""
        assert "tokenizers differ" in reason and "tokenizer_source: union" in reason and "shape" not in reason
