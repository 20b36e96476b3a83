"""umm's lean Llama forward and plain tokenizer (umm.eval.native) give transformers' bits, or step aside."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from umm.eval import evaluate_folder
from umm.eval.generate import generate
from umm.eval.native import NativeLlama, NativeTokenizer, load_native_llama, load_native_tokenizer

PROMPTS = ["Question: Tom has 3 apples.", "def add(a, b):", "x", "The quick brown fox jumps over the lazy dog. 0123"]
CPU = torch.device("cpu")


def _hf(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _copy_with(src: Path, dest: Path, **config) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.update(config)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.fixture(scope="module")
def tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from umm.experts.random_models import make_random_llama

    return make_random_llama(tmp_path_factory.mktemp("tied") / "m", seed=3, tie_word_embeddings=True)


@pytest.mark.parametrize("which", ["math", "tied"])
def test_logits_are_bitwise_those_of_transformers(tiny_models, tied, which, one_thread) -> None:
    folder = tied if which == "tied" else tiny_models["math"]
    native, (hf, _) = load_native_llama(folder, CPU), _hf(folder)
    assert isinstance(native, NativeLlama)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        a = native(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        b = hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        assert torch.equal(a.logits, b.logits)
        # one decoding step on the cache, padded row and all
        step, mask2 = torch.tensor([[9], [10]]), torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], -1)
        a2 = native(step, attention_mask=mask2, position_ids=pos[:, -1:] + 1, cache=a.cache, logits_to_keep=1)
        b2 = hf(input_ids=step, attention_mask=mask2, position_ids=pos[:, -1:] + 1, cache=b.cache, logits_to_keep=1)
        assert torch.equal(a2.logits, b2.logits)


def test_without_a_mask_and_with_several_new_tokens_too(tiny_models, one_thread) -> None:
    """No attention mask: causal prefill, then two tokens at once on the cache (a causal mask with an offset)."""
    native, (hf, _) = load_native_llama(tiny_models["code"], CPU), _hf(tiny_models["code"])
    ids, more = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]]), torch.tensor([[5, 8], [9, 7]])
    with torch.inference_mode():
        a, b = native(ids, use_cache=True), hf(input_ids=ids, use_cache=True)
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(native(more, cache=a.cache).logits, hf(input_ids=more, cache=b.cache).logits)


def test_greedy_outputs_equal_transformers(tiny_models, one_thread) -> None:
    folder = tiny_models["math"]
    native = load_native_llama(folder, CPU)
    hf, tok = _hf(folder)
    for bs in (1, 3):
        ours = generate(native, tok, PROMPTS, max_new_tokens=12, stop=("\n\n", "e"), batch_size=bs)
        assert ours == generate(hf, tok, PROMPTS, max_new_tokens=12, stop=("\n\n", "e"), batch_size=bs)


@pytest.mark.parametrize("change", [{"attention_bias": True}, {"num_key_value_heads": 2}, {"hidden_act": "gelu"},
                                    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
                                    {"model_type": "mistral", "architectures": ["MistralForCausalLM"]},
                                    {"dtype": "bfloat16"}])
def test_anything_else_is_left_to_transformers(tiny_models, tmp_path, change) -> None:
    assert load_native_llama(_copy_with(tiny_models["math"], tmp_path / "m", **change), CPU) is None


def test_not_on_other_devices_or_dtypes(tiny_models) -> None:
    assert load_native_llama(tiny_models["math"], CPU, "bfloat16") is None
    assert load_native_llama(tiny_models["math"], torch.device("meta")) is None


def test_a_missing_tensor_is_left_to_transformers_to_report(tiny_models, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = _copy_with(tiny_models["math"], tmp_path / "m")
    (weights,) = folder.glob("*.safetensors")
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    assert load_native_llama(folder, CPU) is None


def _plain_tokenizer_folder(src: Path, dest: Path) -> Path:
    """``src`` with a tokenizer_config.json of only the keys the native tokenizer accepts."""
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "tokenizer_config.json").read_text())
    keep = {k: v for k, v in cfg.items() if k in ("bos_token", "eos_token", "pad_token", "unk_token", "model_max_length")}
    (dest / "tokenizer_config.json").write_text(json.dumps({**keep, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return dest


def test_tokenizer_encodes_and_decodes_as_transformers(tiny_models, tmp_path) -> None:
    from transformers import AutoTokenizer

    folder = _plain_tokenizer_folder(tiny_models["math"], tmp_path / "m")
    ours, theirs = load_native_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert isinstance(ours, NativeTokenizer)
    assert (ours.pad_token_id, ours.eos_token_id) == (theirs.pad_token_id, theirs.eos_token_id)
    for p in PROMPTS:
        ids = ours(p)["input_ids"]
        assert ids == theirs(p)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


def test_tokenizer_with_other_settings_is_left_to_transformers(tiny_models, tmp_path) -> None:
    folder = _plain_tokenizer_folder(tiny_models["math"], tmp_path / "m")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": True}))
    assert load_native_tokenizer(folder) is None
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{{ messages }}"}))
    assert load_native_tokenizer(folder) is None


def test_evaluate_folder_scores_the_same_with_and_without(tiny_models, tmp_path, monkeypatch, one_thread) -> None:
    folder = _plain_tokenizer_folder(tiny_models["math"], tmp_path / "m")
    assert load_native_tokenizer(folder) is not None and load_native_llama(folder, CPU) is not None
    args = dict(split="search", limit=8, batch_size=4, device="cpu", max_new_tokens=8)
    fast = evaluate_folder(folder, ["synth-math"], **args)
    monkeypatch.setenv("UMM_SPEEDUPS", "0")
    plain = evaluate_folder(folder, ["synth-math"], **args)
    assert fast.samples == plain.samples and fast.scores["synth-math"].score == plain.scores["synth-math"].score
