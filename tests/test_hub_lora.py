"""``model+adapter``: a PEFT LoRA adapter folder applied in memory when the merge reads the model
(umm/checkpoints/lora.py): W + alpha/r * B @ A, rsLoRA, embeddings, and the refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from umm.checkpoints.errors import NotSafetensorsError
from umm.checkpoints.lora import AdapterError, LoraCheckpoint
from umm.checkpoints.reader import Checkpoint

TARGETS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


def make_adapter(folder: Path, base: Path, *, rank: int, alpha: float, rslora: bool = False,
                 embedding: bool = False, seed: int = 0) -> Path:
    """A PEFT-layout LoRA adapter for ``base`` (keys ``base_model.model.<module>.lora_A.weight``)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    tensors = {}
    with Checkpoint.open(base) as ckpt:
        for module in TARGETS:
            out_f, in_f = ckpt.tensors[f"{module}.weight"].shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, in_f, generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
        if embedding:
            vocab, dim = ckpt.tensors["model.embed_tokens.weight"].shape
            tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(rank, vocab, generator=g)
            tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(dim, rank, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": [m.rsplit(".", 1)[1] for m in TARGETS], "base_model_name_or_path": str(base),
    }))
    return folder


@pytest.mark.parametrize("rslora", [False, True])
def test_reads_return_w_plus_scaled_b_at_a(tiny_models, tmp_path, rslora):
    adapter = make_adapter(tmp_path / "lora", tiny_models["base"], rank=4, alpha=8, rslora=rslora, embedding=True)
    scale = 8 / math.sqrt(4) if rslora else 8 / 4
    lora = load_file(adapter / "adapter_model.safetensors")
    base = load_file(tiny_models["base"] / "model.safetensors")
    with LoraCheckpoint.open(tiny_models["base"], adapter) as ckpt:
        for module in TARGETS:
            a, b = lora[f"base_model.model.{module}.lora_A.weight"], lora[f"base_model.model.{module}.lora_B.weight"]
            want = base[f"{module}.weight"] + scale * b @ a
            got = ckpt.get_tensor(f"{module}.weight")
            torch.testing.assert_close(got, want)
            torch.testing.assert_close(ckpt.get_rows(f"{module}.weight", 3, 9), want[3:9])
        ea = lora["base_model.model.model.embed_tokens.lora_embedding_A"]
        eb = lora["base_model.model.model.embed_tokens.lora_embedding_B"]
        want = base["model.embed_tokens.weight"] + scale * (eb @ ea).T
        torch.testing.assert_close(ckpt.get_tensor("model.embed_tokens.weight"), want)
        torch.testing.assert_close(ckpt.get_rows("model.embed_tokens.weight", 10, 20), want[10:20])
        untouched = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(ckpt.get_tensor(untouched), base[untouched])
        assert dict(ckpt.tensors) == dict(Checkpoint.open(tiny_models["base"]).tensors)


def test_a_merge_recipe_with_model_plus_adapter_merges_the_adapted_weights(tiny_models, tmp_path):
    from umm.merge.disk import merge
    from umm.merge.recipe import MergeRecipe

    adapter = make_adapter(tmp_path / "lora", tiny_models["base"], rank=2, alpha=2)
    ref = f"{tiny_models['base']}+{adapter}"
    recipe = MergeRecipe.from_yaml(yaml.safe_dump({
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": ref, "parameters": {"weight": 1.0}}, {"model": str(tiny_models["math"]),
                                                                   "parameters": {"weight": 1.0}}]}))
    merge(recipe, tmp_path / "out")
    out = load_file(tmp_path / "out" / "model.safetensors")
    math_w = load_file(tiny_models["math"] / "model.safetensors")
    with LoraCheckpoint.open(tiny_models["base"], adapter) as ckpt:
        name = f"{TARGETS[0]}.weight"
        torch.testing.assert_close(out[name], (ckpt.get_tensor(name) + math_w[name]) / 2)
    assert ref in (tmp_path / "out" / "README.md").read_text()


def test_adapters_that_cannot_apply_are_refused(tiny_models, tmp_path):
    good = make_adapter(tmp_path / "lora", tiny_models["base"], rank=2, alpha=2)
    pickle_only = tmp_path / "pickled"
    pickle_only.mkdir()
    shutil.copyfile(good / "adapter_config.json", pickle_only / "adapter_config.json")
    (pickle_only / "adapter_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(NotSafetensorsError, match="pickle"):
        LoraCheckpoint.open(tiny_models["base"], pickle_only)
    dora = tmp_path / "dora"
    shutil.copytree(good, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        LoraCheckpoint.open(tiny_models["base"], dora)
    other = tmp_path / "other"
    other.mkdir()
    t = load_file(good / "adapter_model.safetensors")
    t = {k.replace("layers.0", "layers.7"): v for k, v in t.items()}
    save_file(t, other / "adapter_model.safetensors")
    shutil.copyfile(good / "adapter_config.json", other / "adapter_config.json")
    with pytest.raises(AdapterError, match="another base model"):
        LoraCheckpoint.open(tiny_models["base"], other)
