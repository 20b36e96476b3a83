"""Loading models and tokenizers: local, safetensors-only, no remote code, usable for inference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.checkpoints import (
    Checkpoint,
    CheckpointError,
    NotSafetensorsError,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from umm.errors import UmmError


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == resolve_device(None)
    with pytest.raises(UmmError, match="unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(UmmError, match="CUDA is not available"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(UmmError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        ("auto", None),
        (None, None),
        (torch.float64, torch.float64),
    ],
)
def test_resolve_dtype(name: object, want: torch.dtype | None) -> None:
    assert resolve_dtype(name) == want  # type: ignore[arg-type]


def test_resolve_dtype_rejects_unknown() -> None:
    with pytest.raises(UmmError, match="unknown dtype 'int4'"):
        resolve_dtype("int4")


def test_load_causal_lm_forward_pass_uses_the_checkpoint(tiny_models: dict[str, Path]) -> None:
    model = load_causal_lm(tiny_models["math"], device="cpu")
    tokenizer = load_tokenizer(tiny_models["math"])
    assert not model.training and model.dtype == torch.float32
    with Checkpoint.open(tiny_models["math"]) as ckpt:
        name = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(model.state_dict()[name], ckpt.get_tensor(name))
    batch = tokenizer(["def add(a, b):", "Question: 3 + 4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(tokenizer("x = 7")["input_ids"]) == "x = 7"
    assert tokenizer.pad_token is not None


def test_load_causal_lm_casts_dtype(tiny_models: dict[str, Path]) -> None:
    model = load_causal_lm(tiny_models["base"], dtype="bf16")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 9]])).logits
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 384)


def test_refuses_pickle_only_and_remote_code(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(tiny_models["base"] / "config.json", folder / "config.json")
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(NotSafetensorsError, match="pickle"):
        load_causal_lm(folder)
    remote = tmp_path / "remote"
    shutil.copytree(tiny_models["base"], remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"{remote}.*auto_map"):
        load_causal_lm(remote)


def test_refuses_checkpoint_missing_weights(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """A tensor absent from the file would be silently random-initialised by transformers."""
    folder = tmp_path / "m"
    shutil.copytree(tiny_models["base"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lm_head.weight.*partly random"):
        load_causal_lm(folder)


def test_load_tokenizer_refusals(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(tiny_models["base"], folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="custom code"):
        load_tokenizer(folder)
    # the tokenizer class named by the model's config.json is refused the same way, before loading
    by_model = tmp_path / "tok2"
    shutil.copytree(tiny_models["base"], by_model)
    config = json.loads((by_model / "config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (by_model / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: the tokenizer needs custom code"):
        load_tokenizer(by_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        load_tokenizer(empty)
