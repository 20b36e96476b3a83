"""Parameter values and their resolution per tensor (mergekit's gradients, filters, precedence)."""

from __future__ import annotations

import pytest

from umm.errors import UmmError
from umm.merge import MergeRecipe, get_method, layer_index, layer_t, resolve, resolve_tensor_params


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.7.mlp.up_proj.weight", 7),
        ("transformer.h.11.attn.c_attn.weight", 11),
        ("blocks.0.ffn.weight", 0),
        ("encoder.layer.3.output.dense.weight", 3),
        ("model.layers.2.mlp.experts.5.w1.weight", 2),
        ("model.embed_tokens.weight", None),
        ("model.norm.weight", None),
        ("lm_head.weight", None),
        ("model.mylayers.3.weight", None),
    ],
)
def test_layer_index(name, index):
    assert layer_index(name) == index


def test_scalar_and_bool_values():
    assert resolve(0.5, "model.layers.3.mlp.weight", 8) == 0.5
    assert resolve(2, "lm_head.weight", 8) == 2.0
    assert resolve(True, "model.layers.0.x", 8) is True


def test_gradient_interpolation_first_middle_last_and_non_layer():
    grad = [0.0, 1.0, 0.5]
    n = 5  # t = L/4 -> positions 0, .5, 1, 1.5, 2 on the gradient
    assert resolve(grad, "model.layers.0.mlp.weight", n) == 0.0
    assert resolve(grad, "model.layers.1.mlp.weight", n) == pytest.approx(0.5)
    assert resolve(grad, "model.layers.2.mlp.weight", n) == pytest.approx(1.0)
    assert resolve(grad, "model.layers.3.mlp.weight", n) == pytest.approx(0.75)
    assert resolve(grad, "model.layers.4.mlp.weight", n) == 0.5
    # embeddings, final norm and lm_head are evaluated at t = 0 (mergekit's pre/post weights)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert resolve(grad, name, n) == 0.0
    # a single layer sits at t = 1
    assert resolve(grad, "model.layers.0.mlp.weight", 1) == 0.5
    assert layer_t("model.layers.3.x", 7) == 0.5


def test_layer_beyond_the_model_is_an_error():
    with pytest.raises(UmmError, match="layer 9"):
        resolve([0.0, 1.0], "model.layers.9.mlp.weight", 4)


def test_filter_rules_first_match_wins_and_unmatched_is_unset():
    rules = [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"filter": "mlp", "value": 0.3},
        {"filter": "attn", "value": 0.9},
    ]
    assert resolve(rules, "model.layers.3.self_attn.q_proj.weight", 4) == pytest.approx(1.0)
    assert resolve(rules, "model.layers.3.mlp.up_proj.weight", 4) == 0.3
    assert resolve(rules, "transformer.h.0.attn.c_proj.weight", 4) == 0.9
    assert resolve(rules, "model.norm.weight", 4) is None
    assert resolve([*rules, {"value": 0.1}], "model.norm.weight", 4) == 0.1
    assert resolve([{"filter": "*", "value": 0.2}, {"value": 0.1}], "model.norm.weight", 4) == 0.2
    assert resolve({"filter": "mlp", "value": 0.4}, "model.layers.0.mlp.x", 4) == 0.4
    assert resolve([], "model.layers.0.mlp.x", 4) is None


RECIPE = """
merge_method: ties
base_model: base
models:
  - model: base
  - model: a
    parameters:
      weight: 1.0
      density:
        - filter: mlp
          value: 0.2
  - model: b
    parameters:
      weight: [0.0, 1.0]
parameters:
  density: 0.7
  weight: 0.25
  normalize: false
  lambda:
    - filter: lm_head
      value: 2.0
"""


def test_precedence_per_model_over_global_then_method_default():
    recipe = MergeRecipe.from_yaml(RECIPE)
    ties = get_method("ties")
    mlp = resolve_tensor_params(recipe, ties, "model.layers.3.mlp.up_proj.weight", 4)
    assert mlp.models == ("a", "b")  # the base is not a merge source
    assert mlp.per_model[0] == {"weight": 1.0, "density": 0.2}
    assert mlp.per_model[1] == {"weight": 1.0, "density": 0.7}  # density from global parameters
    assert mlp.global_ == {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}
    attn = resolve_tensor_params(recipe, ties, "model.layers.1.self_attn.q_proj.weight", 4)
    assert attn.per_model[0]["density"] == 0.7  # per-model filter did not match: falls to global
    assert attn.per_model[1]["weight"] == pytest.approx(1 / 3)
    head = resolve_tensor_params(recipe, ties, "lm_head.weight", 4)
    assert head.global_["lambda"] == 2.0
    assert head.per_model[1]["weight"] == 0.0  # gradients read t = 0 outside the layers


def test_missing_required_parameter_names_model_and_tensor():
    recipe = MergeRecipe.from_yaml(
        """
merge_method: task_arithmetic
base_model: base
models:
  - model: a
    parameters:
      weight:
        - filter: mlp
          value: 0.5
"""
    )
    ta = get_method("task_arithmetic")
    assert resolve_tensor_params(recipe, ta, "model.layers.0.mlp.x", 2).per_model[0]["weight"] == 0.5
    with pytest.raises(UmmError, match=r"missing required parameter 'weight' for model a.*self_attn"):
        resolve_tensor_params(recipe, ta, "model.layers.0.self_attn.x", 2)


def test_slice_parameters_sit_between_model_and_global():
    recipe = MergeRecipe.from_yaml(
        """
slices:
  - sources:
      - model: base
        layer_range: [0, 4]
      - model: other
        layer_range: [0, 4]
    parameters:
      t:
        - filter: self_attn
          value: [0, 1]
merge_method: slerp
base_model: base
parameters:
  t: 0.5
"""
    )
    slerp = get_method("slerp")
    assert resolve_tensor_params(recipe, slerp, "model.layers.3.self_attn.o.weight", 4).global_["t"] == 1.0
    assert resolve_tensor_params(recipe, slerp, "model.layers.3.mlp.down.weight", 4).global_["t"] == 0.5
    with pytest.raises(UmmError, match="stacks layers"):  # a 4-layer slice of 6-layer models
        resolve_tensor_params(recipe, slerp, "model.layers.3.mlp.down.weight", 6)


def test_linear_base_model_is_an_input_needing_a_weight():
    recipe = MergeRecipe.from_yaml(
        """
merge_method: linear
base_model: base
models:
  - model: a
    parameters: {weight: 0.7}
parameters:
  weight: 0.3
"""
    )
    p = resolve_tensor_params(recipe, get_method("linear"), "model.norm.weight", 2)
    assert p.models == ("a", "base")
    assert [m["weight"] for m in p.per_model] == [0.7, 0.3]
