"""Recipes: mergekit's YAML in, mergekit-valid YAML out, clear errors for what cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from umm.errors import UmmError
from umm.merge import Genome, MergeRecipe, get_method, resolve_tensor_params

# Recipes in the style of mergekit's examples/ (ties.yml, linear.yml, gradient-slerp.yml, ...).
TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""
LINEAR = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      weight: 1.0
  - model: WizardLM/WizardLM-13B-V1.2
    parameters:
      weight: 0.3
  - model: garage-bAInd/Platypus2-13B
    parameters:
      weight: 0.5
merge_method: linear
dtype: float16
"""
GRADIENT_SLERP = """
slices:
  - sources:
      - model: psmathur/orca_mini_v3_13b
        layer_range: [0, 40]
      - model: garage-bAInd/Platypus2-13B
        layer_range: [0, 40]
merge_method: slerp
base_model: psmathur/orca_mini_v3_13b
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5 # fallback for rest of tensors
dtype: float16
"""
DARE_TIES = """
models:
  - model: mistralai/Mistral-7B-v0.1
    # no parameters necessary for base model
  - model: samir-fama/SamirGPT-v1
    parameters:
      density: 0.53
      weight: 0.4
  - model: abacusai/Slerp-CM-mist-dpo
    parameters:
      density: 0.53
      weight: 0.3
merge_method: dare_ties
base_model: mistralai/Mistral-7B-v0.1
parameters:
  int8_mask: true
dtype: bfloat16
tokenizer_source: base
"""
BREADCRUMBS = """
models:
  - model: a
    parameters: {weight: 0.6, density: 0.9, gamma: 0.02}
  - model: b
    parameters: {weight: 0.4, density: 0.8}
merge_method: breadcrumbs
base_model: base
out_dtype: bfloat16
chat_template: chatml
"""
EXAMPLES = {"ties": TIES, "linear": LINEAR, "slerp": GRADIENT_SLERP, "dare_ties": DARE_TIES,
            "breadcrumbs": BREADCRUMBS}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_mergekit_examples_parse_validate_and_round_trip(name):
    recipe = MergeRecipe.from_yaml(EXAMPLES[name])
    recipe.validate_for_merge()
    assert recipe.merge_method == name
    again = MergeRecipe.from_yaml(recipe.to_yaml())
    assert again == recipe
    assert again.to_yaml() == recipe.to_yaml()


def test_roles_of_models():
    ties = MergeRecipe.from_yaml(TIES)
    assert ties.model_paths()[0] == "TheBloke/Llama-2-13B-fp16"
    assert len(ties.model_paths()) == 4
    dare = MergeRecipe.from_yaml(DARE_TIES)  # the base is listed among the models too
    assert dare.model_paths() == ["mistralai/Mistral-7B-v0.1", "samir-fama/SamirGPT-v1", "abacusai/Slerp-CM-mist-dpo"]
    assert dare.source_models() == ["samir-fama/SamirGPT-v1", "abacusai/Slerp-CM-mist-dpo"]
    assert dare.merge_base() == "mistralai/Mistral-7B-v0.1"
    slerp = MergeRecipe.from_yaml(GRADIENT_SLERP)
    assert slerp.source_models() == ["garage-bAInd/Platypus2-13B"]
    linear = MergeRecipe.from_yaml(LINEAR)
    assert linear.merge_base() is None and len(linear.source_models()) == 3


def test_to_yaml_is_mergekit_style():
    text = MergeRecipe.from_yaml(TIES).to_yaml()
    assert "density: [1.0, 0.7, 0.1]" in text  # numeric lists in flow style
    assert "filter: null" not in text
    assert text.startswith("merge_method: ties\nbase_model: TheBloke/Llama-2-13B-fp16\nmodels:")


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(UmmError) as exc:
        MergeRecipe.from_yaml("merge_method: ties\nmodels: [{model: a}]\nbase_modle: b\n")
    msg = str(exc.value)
    assert "base_modle" in msg and "base_model" in msg and "merge_method" in msg
    with pytest.raises(UmmError, match=r"unknown key 'weight'.*valid keys: model, parameters"):
        MergeRecipe.from_yaml("merge_method: ties\nmodels: [{model: a, weight: 1}]\n")
    with pytest.raises(UmmError, match=r"unknown key 'filtr'.*valid keys: filter, value"):
        MergeRecipe.from_yaml("merge_method: ties\nmodels: [{model: a, parameters: {weight: [{filtr: x, value: 1}]}}]\n")
    with pytest.raises(UmmError, match="a parameter is a number"):
        MergeRecipe.from_yaml("merge_method: ties\nmodels: [{model: a, parameters: {weight: abc}}]\n")


def test_bad_yaml_names_the_line(tmp_path: Path):
    bad = tmp_path / "r.yaml"
    bad.write_text("merge_method: ties\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    with pytest.raises(UmmError, match=r"r.yaml, line 4, column \d+: not valid YAML"):
        MergeRecipe.load(bad)
    with pytest.raises(UmmError, match="cannot read recipe"):
        MergeRecipe.load(tmp_path / "missing.yaml")
    with pytest.raises(UmmError, match="mapping"):
        MergeRecipe.from_yaml("- just\n- a list\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("merge_method: tie\nbase_model: b\nmodels: [{model: a}]", r"unknown merge_method 'tie'; valid: .*ties"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, densty: 1}}]",
         r"unknown parameter 'densty' for ties; valid: .*density.*normalize"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\nparameters: {gamma: 1}",
         r"unknown parameter 'gamma' for ties"),
        ("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]", "needs a base_model"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a}]", r"missing required parameter 'weight'"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, normalize: true}}]",
         r"'normalize' is a global parameter"),
        ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.5}",
         "exactly two models"),
        ("merge_method: slerp\nbase_model: b\nmodels: [{model: a}]", r"needs parameter 't'"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: a, parameters: {weight: 1}}]",
         "more than once"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: .nan}}]", "finite"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: float8", "dtype"),
        ("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ntokenizer_source: zzz",
         "tokenizer_source"),
        ("merge_method: linear\nmodels: []", "lists no models"),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: b}]", "no model to merge besides the base"),
        ("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n"
         "  - sources: [{model: a, layer_range: [0, 4]}, {model: c, layer_range: [0, 4]}]\n"
         "  - sources: [{model: c, layer_range: [4, 8]}]",
         r"slice 1: slerp needs the base_model a among the slice's sources"),
        ("merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n"
         "  - sources: [{model: a, layer_range: [0, 4]}, {model: c, layer_range: [2, 8]}]",
         "same number of layers"),
        ("merge_method: passthrough\nslices:\n"
         "  - sources: [{model: a, layer_range: [0, 4]}, {model: c, layer_range: [0, 4]}]",
         r"passthrough merges exactly 1 model\(s\); got 2"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [3, 3]}]",
         r"0 <= start < end"),
        ("merge_method: model_stock\nbase_model: b\nmodels: [{model: a}]", "at least 2 model"),
        ("merge_method: arcee_fusion\nbase_model: a\nmodels: [{model: a}, {model: b}, {model: c}]",
         "exactly 1 model"),
        ("merge_method: nuslerp\nmodels: [{model: a, parameters: {weight: 1}}]", "exactly 2 model"),
    ],
)
def test_recipes_umm_cannot_run_get_clear_errors(text, message):
    with pytest.raises(UmmError, match=message):
        MergeRecipe.from_yaml(text).validate_for_merge()


# ------------------------------------------------------------------------- mergekit itself
# Opt-in (importing mergekit takes 5-40 s): UMM_MERGEKIT_PYTHON=/tmp/mergekit-venv/bin/python
MERGEKIT_PYTHON = os.environ.get("UMM_MERGEKIT_PYTHON", "")

_MK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from mergekit.config import MergeConfiguration, evaluate_setting
    job = json.load(sys.stdin)
    out = []
    for item in job:
        cfg = MergeConfiguration.model_validate(__import__("yaml").safe_load(item["yaml"]))
        vals = {}
        for name, t in item["probes"]:
            row = []
            for m in cfg.models:
                s = (m.parameters or {}).get("weight")
                if s is None:
                    s = (cfg.parameters or {}).get("weight")
                v = evaluate_setting(name, s, t, validate=float)
                row.append(v)
            vals[name] = row
        out.append({"method": cfg.merge_method, "models": [str(m.model) for m in cfg.models], "vals": vals})
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not MERGEKIT_PYTHON or not Path(MERGEKIT_PYTHON).exists(),
                    reason="set UMM_MERGEKIT_PYTHON to a python with mergekit installed")
def test_written_recipes_load_and_resolve_identically_in_mergekit():
    """umm's YAML parses in mergekit's MergeConfiguration and mergekit resolves the same weights."""
    import numpy as np

    genome = Genome.uniform("ties", "base", ["m1", "m2"], num_layers=6, groups=3, filters=("mlp",))
    genome = genome.with_vector(np.linspace(-1, 1, genome.values.size))
    recipes = [MergeRecipe.from_yaml(TIES), genome.to_recipe(dtype="bfloat16")]
    names = ["model.embed_tokens.weight", "lm_head.weight"] + [
        f"model.layers.{i}.{p}.weight" for i in range(6) for p in ("mlp.up_proj", "self_attn.q_proj")
    ]
    job = [{"yaml": r.to_yaml(), "probes": [(n, _t(n, 6)) for n in names]} for r in recipes]
    proc = subprocess.run([MERGEKIT_PYTHON, "-c", _MK_SCRIPT], input=json.dumps(job), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    for recipe, got in zip(recipes, result):
        assert got["method"] == recipe.merge_method
        method = get_method(recipe.merge_method)
        for n in names:
            ours = resolve_tensor_params(recipe, method, n, 6)
            theirs = dict(zip(got["models"], got["vals"][n]))
            for model, params in zip(ours.models, ours.per_model):
                assert params["weight"] == pytest.approx(theirs[model], rel=1e-12, abs=1e-12), (n, model)


def _t(name: str, num_layers: int) -> float:
    from umm.merge import layer_t

    return layer_t(name, num_layers)


def test_null_parameters_and_mergekit_evolve_layer_ranges_are_accepted():
    recipe = MergeRecipe.from_yaml(
        """
merge_method: ties
base_model: base
models:
  - model: base
    parameters:
  - model: a
    layer_range: [0, 4]
    parameters: {weight: 1, density: 0.5}
parameters:
"""
    )
    recipe.validate_for_merge()
    assert recipe.models[0].parameters == {} and recipe.parameters == {}
    assert MergeRecipe.from_yaml(recipe.to_yaml()) == recipe
    ties = get_method("ties")
    assert resolve_tensor_params(recipe, ties, "model.layers.3.mlp.w", 4).per_model[0]["density"] == 0.5
    with pytest.raises(UmmError, match="layer_range"):
        resolve_tensor_params(recipe, ties, "model.layers.3.mlp.w", 8)
