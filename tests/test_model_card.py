"""What a merge writes besides its tensors: the model card (huggingface_hub's ModelCard), the chat
template, all built and checked before any tensor is merged; and recipes umm refuses plainly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard

from umm.merge.chat_template import NAMED_TEMPLATES, ChatTemplateError
from umm.merge.disk import merge
from umm.merge.recipe import MergeRecipe, RecipeError


def _slerp_with_filters(tiny_models, **extra) -> MergeRecipe:
    """gradient-slerp's features: a t gradient per filter, a default, a base model."""
    return MergeRecipe.from_dict({
        "merge_method": "slerp", "base_model": str(tiny_models["base"]),
        "slices": [{"sources": [{"model": str(tiny_models["base"]), "layer_range": [0, 2]},
                                {"model": str(tiny_models["math"]), "layer_range": [0, 2]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]},
        "dtype": "float32", **extra,
    })


def test_a_recipe_with_filter_rules_writes_a_card_the_hub_can_read(tiny_models, tmp_path):
    out = tmp_path / "m"
    merge(_slerp_with_filters(tiny_models), out)
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["tags"] == ["merge", "umm", "slerp"]
    rules = data["umm"]["recipe"]["parameters"]["t"]
    assert rules[0] == {"filter": "self_attn", "value": [0, 0.5, 1]} and rules[2] == {"value": 0.5}
    assert data["umm"]["sources"] == [str(tiny_models["base"]), str(tiny_models["math"])]
    assert "base_model" not in data  # local paths are no hub ids: named in the text, not linked
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["umm"]["method"] == "slerp"
    assert "merge_method: slerp" in card.text and f"`{tiny_models['math']}`" in card.text


def test_card_data_names_hub_sources_as_base_models_of_a_merge():
    from umm.checkpoints.writer import model_card

    text = model_card(method="ties", sources=["org/base", "org/math@v2", "org/code+org/lora", "./local/x"],
                      base_model="org/base", recipe={"merge_method": "ties"}, recipe_yaml="merge_method: ties\n",
                      out_dtype="bfloat16", version="9.9", scores={"gsm8k": 0.25})
    data = ModelCard(text).data.to_dict()
    assert data["base_model"] == ["org/base", "org/math", "org/code"]
    assert data["base_model_relation"] == "merge"
    assert data["umm"]["scores"] == {"gsm8k": 0.25}
    assert "| gsm8k | 0.2500 |" in text


def test_the_card_and_extras_are_built_before_any_tensor_is_merged(tiny_models, tmp_path, monkeypatch):
    import umm.merge.disk as disk

    merged = []
    monkeypatch.setattr(disk, "merge_tensors", lambda *a, **k: merged.append(1) or 0)

    def broken(**kw):
        raise RuntimeError("card failed")

    monkeypatch.setattr(disk, "model_card", broken)
    with pytest.raises(RuntimeError, match="card failed"):
        merge(_slerp_with_filters(tiny_models), tmp_path / "m")
    assert merged == [] and not (tmp_path / "m").exists()
    monkeypatch.undo()
    monkeypatch.setattr(disk, "merge_tensors", lambda *a, **k: merged.append(1) or 0)
    with pytest.raises(ChatTemplateError):
        merge(_slerp_with_filters(tiny_models, chat_template="nosuchname"), tmp_path / "m")
    assert merged == []


def _template_of(out: Path) -> str:
    from transformers import AutoTokenizer

    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert not (out / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    assert tok.chat_template == cfg["chat_template"]
    return tok.chat_template


@pytest.mark.parametrize("name", ["chatml", "alpaca", "llama3"])
def test_a_named_chat_template_is_written_into_tokenizer_config(tiny_models, tmp_path, name):
    out = tmp_path / name
    merge(_slerp_with_filters(tiny_models, chat_template=name), out)
    assert _template_of(out) == NAMED_TEMPLATES[name]
    if name == "chatml":
        from transformers import AutoTokenizer

        text = AutoTokenizer.from_pretrained(out).apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_jinja_string_and_auto_are_written_and_bad_ones_refused(tiny_models, tmp_path):
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    merge(_slerp_with_filters(tiny_models, chat_template=jinja), tmp_path / "j")
    assert _template_of(tmp_path / "j") == jinja
    with pytest.raises(ChatTemplateError, match="none of the models has a chat template"):
        merge(_slerp_with_filters(tiny_models, chat_template="auto"), tmp_path / "a0")
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        merge(_slerp_with_filters(tiny_models, chat_template="{% for x in %}"), tmp_path / "bad")
    # auto: the template the models carry (here the one merged just before)
    recipe = MergeRecipe.from_dict({"merge_method": "linear", "chat_template": "auto", "dtype": "float32",
                                    "models": [{"model": str(tiny_models["base"]), "parameters": {"weight": 1}},
                                               {"model": str(tmp_path / "j"), "parameters": {"weight": 1}}]})
    merge(recipe, tmp_path / "a")
    assert _template_of(tmp_path / "a") == jinja


def test_a_mergekit_moe_config_is_told_moe_assembly_is_unsupported():
    with pytest.raises(RecipeError, match=r"mergekit-moe") as e:
        MergeRecipe.from_yaml("base_model: a/b\ngate_mode: hidden\nexperts:\n  - source_model: c/d\n")
    assert "not support" in str(e.value) and "unknown key" not in str(e.value)
