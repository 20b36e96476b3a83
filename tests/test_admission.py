"""Admission of untrusted folders: each kind of bad model is refused with its specific reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.checkpoints import (
    AdmissionLimits,
    Checkpoint,
    CheckpointError,
    CheckpointTooLargeError,
    NonFiniteTensorError,
    NotSafetensorsError,
    admit,
    build_manifest,
    check_finite,
    fingerprint,
)
from umm.experts.random_models import make_random_llama


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_good_model_is_admitted_with_its_identity(tiny_models: dict[str, Path]) -> None:
    report = admit(tiny_models["math"])
    with Checkpoint.open(tiny_models["math"]) as ckpt:
        assert report.fingerprint == fingerprint(ckpt)
        assert report.num_parameters == ckpt.num_parameters
    assert report.manifest == build_manifest(tiny_models["math"])
    assert report.fingerprint.tokenizer is not None


def test_sharded_and_tied_models_are_admitted(tmp_path: Path) -> None:
    sharded = make_random_llama(tmp_path / "sharded", seed=4, max_shard_size="40KB", dtype=torch.bfloat16)
    tied = make_random_llama(tmp_path / "tied", seed=4, tie_word_embeddings=True)
    assert admit(sharded).manifest.total_bytes > 0
    with Checkpoint.open(tied) as ckpt:
        assert "lm_head.weight" not in ckpt  # tied to the embedding, stored once
    assert admit(tied).num_parameters > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_name_the_tensor_and_model(tiny_models: dict[str, Path], tmp_path: Path, bad: float) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "broken")
    target = "model.layers.1.mlp.up_proj.weight"
    _edit_weights(folder, lambda t: t[target].view(-1).__setitem__(17, bad))
    with pytest.raises(NonFiniteTensorError, match=f"'{target}' in {folder}"):
        admit(folder)
    admit(folder, AdmissionLimits(check_finite=False))  # the scan is what catches it


def test_check_finite_on_tensors() -> None:
    check_finite(torch.zeros(3), "ok")
    check_finite(torch.tensor([1, 2], dtype=torch.int64), "ints")  # integers cannot be non-finite
    check_finite(torch.empty(0), "empty")
    # Large finite values whose sum overflows are still finite (the fast screen must not decide).
    check_finite(torch.full((4,), 3e38), "big")
    check_finite(torch.full((4,), 6e4, dtype=torch.float16), "big16")
    with pytest.raises(NonFiniteTensorError, match="1 NaN and 0 Inf"):
        check_finite(torch.tensor([1.0, float("nan")], dtype=torch.float64), "w64")
    with pytest.raises(NonFiniteTensorError, match=r"'w' in m has 1 NaN and 1 Inf"):
        check_finite(torch.tensor([0.0, float("nan"), float("-inf")], dtype=torch.bfloat16), "w", "m")
    if hasattr(torch, "float8_e5m2"):
        with pytest.raises(NonFiniteTensorError):
            check_finite(torch.tensor([float("inf")]).to(torch.float8_e5m2), "f8")


def test_shapes_that_lie_about_the_config(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "liar")
    config = json.loads((folder / "config.json").read_text())
    _edit_config(folder, intermediate_size=config["intermediate_size"] * 2)
    with pytest.raises(CheckpointError, match=r"weights do not match config.json: tensor 'model.layers.0.mlp.*shape"):
        admit(folder)


def test_missing_and_extra_tensors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "m")
    _edit_weights(folder, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match="'model.layers.0.self_attn.k_proj.weight'.*missing"):
        admit(folder)
    folder = _copy(tiny_models["base"], tmp_path / "extra")
    _edit_weights(folder, lambda t: t.__setitem__("model.payload", torch.zeros(4)))
    with pytest.raises(CheckpointError, match="'model.payload' is not part of the model"):
        admit(folder)


def test_configs_needing_remote_code_or_unknown_types(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "m")
    _edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    with pytest.raises(CheckpointError, match="auto_map"):
        admit(folder)
    folder = _copy(tiny_models["base"], tmp_path / "unknown")
    _edit_config(folder, model_type="totally_new_arch")
    with pytest.raises(CheckpointError, match="'totally_new_arch' is unknown"):
        admit(folder)
    folder = _copy(tiny_models["base"], tmp_path / "t5")
    _edit_config(folder, model_type="t5")
    with pytest.raises(CheckpointError, match="not a causal language model"):
        admit(folder)
    folder = _copy(tiny_models["base"], tmp_path / "classifier")
    _edit_config(folder, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(CheckpointError, match="not a causal LM head"):
        admit(folder)


def test_tokenizer_custom_code_missing_or_too_large(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "m")
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    with pytest.raises(CheckpointError, match="tokenizer needs custom code"):
        admit(folder)
    folder = _copy(tiny_models["base"], tmp_path / "notok")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        admit(folder)
    folder = _copy(tiny_models["base"], tmp_path / "bigtok")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"].append({"id": 100_000, "content": "<huge>", "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="token id 100000 but the model's vocab_size is 384"):
        admit(folder)


def test_size_limits(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(CheckpointTooLargeError, match="exceeds the admission limit"):
        admit(tiny_models["base"], AdmissionLimits(max_total_bytes=100_000))
    with pytest.raises(CheckpointTooLargeError, match="tensors exceed"):
        admit(tiny_models["base"], AdmissionLimits(max_tensors=5))


def test_pickle_only_and_corrupt_folders(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(tiny_models["base"] / "config.json", folder / "config.json")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(NotSafetensorsError):
        admit(folder)
    folder = _copy(tiny_models["base"], tmp_path / "noconfig")
    (folder / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="config.json"):
        admit(folder)


def test_models_renamed_on_load_are_checked_by_parameter_count(tmp_path: Path) -> None:
    """transformers fuses Mixtral's per-expert tensors on load: names differ, counts must not."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from umm.experts.random_models import make_tokenizer

    folder = tmp_path / "moe"
    config = MixtralConfig(
        vocab_size=384, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64,
    )  # fmt: skip
    MixtralForCausalLM(config).save_pretrained(folder)
    make_tokenizer(384).save_pretrained(folder)
    assert admit(folder).num_parameters > 0
    _edit_weights(folder, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.1.w2.weight"))
    with pytest.raises(CheckpointError, match="parameters but config.json implies"):
        admit(folder)
