"""Recipes exercising the features of mergekit's six examples/*.yml (linear, ties with density /
weight gradients and filters, bio-merge's int8_mask, gradient-slerp's slices + filtered t
gradients, the 44-layer passthrough frankenmerge, arcee_fusion), written here for tiny local
stand-ins and run end to end by ``umm merge``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from umm.cli import app
from umm.merge import get_method

runner = CliRunner()


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer base and three experts of it (hidden 32)."""
    from umm.experts.random_models import make_random_llama

    root = tmp_path_factory.mktemp("four_layer")
    base = make_random_llama(root / "base", seed=0, num_layers=4, hidden_size=32, vocab_size=128)
    return {"base": base, **{n: make_random_llama(root / n, seed=i + 1, base=base, noise=0.05)
                             for i, n in enumerate(("a", "b", "c"))}}


def _merge(tmp_path: Path, name: str, recipe: str) -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(recipe)
    out = tmp_path / name
    res = runner.invoke(app, ["merge", str(path), str(out), "--threads", "1"])
    assert res.exit_code == 0, res.output
    return out


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _loads_and_generates(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
    assert ids.shape == (1, 6)


def test_linear_example_form(four_layer, tmp_path):
    m = four_layer
    out = _merge(tmp_path, "linear", f"""\
models:
  - model: {m['a']}
    parameters: {{weight: 1.0}}
  - model: {m['b']}
    parameters: {{weight: 0.3}}
  - model: {m['c']}
    parameters: {{weight: 0.5}}
merge_method: linear
dtype: float16
""")
    got = _tensors(out)["model.layers.1.mlp.up_proj.weight"].float()
    ins = [_tensors(m[k])["model.layers.1.mlp.up_proj.weight"] for k in "abc"]
    want = (1.0 * ins[0] + 0.3 * ins[1] + 0.5 * ins[2]) / 1.8
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)  # fp16 output
    _loads_and_generates(out)


def test_ties_example_form_gradients_and_filters(four_layer, tmp_path):
    m = four_layer
    recipe = f"""\
models:
  - model: {m['a']}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {m['b']}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {m['c']}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {m['base']}
parameters:
  normalize: true
  int8_mask: true
dtype: float32
"""
    out = _merge(tmp_path, "ties", recipe)
    from umm.merge import MergeRecipe
    from umm.merge.params import resolve_tensor_params

    rec = MergeRecipe.from_yaml(recipe)
    ties = get_method("ties")
    src = {k: _tensors(m[k]) for k in ("base", "a", "b", "c")}
    got = _tensors(out)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.2.self_attn.q_proj.weight",
                 "model.embed_tokens.weight"):
        p = resolve_tensor_params(rec, ties, name, 4)
        if name.startswith("model.layers.1.mlp"):  # layer 1 of 4: t = 1/3
            assert p.per_model[0]["density"] == pytest.approx(1 + (0.7 - 1) * (2 / 3))
            assert p.per_model[1]["weight"] == pytest.approx(0.3) and p.per_model[2]["weight"] == 0.5
        if "self_attn" in name:
            assert p.per_model[2]["weight"] == 0.0
        want = ties.merge(src["base"][name], [src[k][name] for k in "abc"], p.per_model, p.global_)
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)
    _loads_and_generates(out)


def test_bio_merge_example_form(four_layer, tmp_path):
    m = four_layer
    out = _merge(tmp_path, "bio", f"""\
models:
  - model: {m['a']}
    parameters: {{density: 0.5, weight: 0.5}}
  - model: {m['b']}
    parameters: {{density: 0.5, weight: 0.5}}
merge_method: ties
base_model: {m['base']}
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""")
    assert all(t.dtype == torch.float16 for t in _tensors(out).values())
    _loads_and_generates(out)


def test_gradient_slerp_example_form_slices_and_filtered_t(four_layer, tmp_path):
    m = four_layer
    out = _merge(tmp_path, "gslerp", f"""\
slices:
  - sources:
      - model: {m['a']}
        layer_range: [0, 4]
      - model: {m['b']}
        layer_range: [0, 4]
merge_method: slerp
base_model: {m['a']}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""")
    got, a, b = _tensors(out), _tensors(m["a"]), _tensors(m["b"])
    slerp = get_method("slerp")
    name = "model.layers.3.self_attn.k_proj.weight"  # t = 1 at the last layer: model b
    torch.testing.assert_close(got[name], slerp.merge(a[name], [b[name]], [{}], {"t": 1.0}), rtol=0, atol=0)
    name = "model.layers.0.mlp.gate_proj.weight"  # t = 1 at the first layer for mlp
    torch.testing.assert_close(got[name], b[name], rtol=0, atol=1e-6)
    name = "model.layers.2.input_layernorm.weight"  # fallback 0.5
    torch.testing.assert_close(got[name], slerp.merge(a[name], [b[name]], [{}], {"t": 0.5}), rtol=0, atol=0)
    _loads_and_generates(out)


def test_passthrough_frankenmerge_stacks_and_renumbers_layers(four_layer, tmp_path):
    """mergekit's 44-layer example in small: layers 0-2 of a, then 1-3 of b -> 6 layers."""
    m = four_layer
    out = _merge(tmp_path, "franken", f"""\
slices:
  - sources:
    - model: {m['a']}
      layer_range: [0, 3]
  - sources:
    - model: {m['b']}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    got, a, b = _tensors(out), _tensors(m["a"]), _tensors(m["b"])
    for j, (src, layer) in enumerate([(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]):
        for leaf in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
            assert torch.equal(got[f"model.layers.{j}.{leaf}"], src[f"model.layers.{layer}.{leaf}"])
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice
    assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])  # last slice
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert len(got) == len(a) + 2 * 9  # two more layers of 9 tensors each
    _loads_and_generates(out)


def test_stacked_slerp_uses_each_slices_own_gradient(four_layer, tmp_path):
    """Two slices of a+b: t runs 0 -> 1 inside each slice (mergekit's per-slice position)."""
    m = four_layer
    out = _merge(tmp_path, "stacked", f"""\
slices:
  - sources:
      - {{model: {m['a']}, layer_range: [0, 2]}}
      - {{model: {m['b']}, layer_range: [0, 2]}}
  - sources:
      - {{model: {m['a']}, layer_range: [1, 4]}}
      - {{model: {m['b']}, layer_range: [1, 4]}}
merge_method: slerp
base_model: {m['a']}
parameters: {{t: [0, 1]}}
dtype: float32
""")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    got, a, b = _tensors(out), _tensors(m["a"]), _tensors(m["b"])
    leaf = "mlp.up_proj.weight"
    for j, (layer, t) in enumerate([(0, 0.0), (1, 1.0), (1, 0.0), (2, 0.5), (3, 1.0)]):
        want = get_method("slerp").merge(a[f"model.layers.{layer}.{leaf}"], [b[f"model.layers.{layer}.{leaf}"]],
                                         [{}], {"t": t})
        torch.testing.assert_close(got[f"model.layers.{j}.{leaf}"], want, rtol=0, atol=0)
    _loads_and_generates(out)


def test_arcee_fusion_example_form(four_layer, tmp_path):
    m = four_layer
    out = _merge(tmp_path, "fusion", f"""\
models:
  - model: {m['a']}
  - model: {m['b']}
merge_method: arcee_fusion
base_model: {m['a']}
dtype: float32
""")
    got, a, b = _tensors(out), _tensors(m["a"]), _tensors(m["b"])
    name = "model.layers.2.mlp.down_proj.weight"
    torch.testing.assert_close(got[name], get_method("arcee_fusion").merge(a[name], [b[name]], [{}], {}),
                               rtol=0, atol=0)
    changed = got[name] != a[name]
    assert 0 < changed.float().mean() < 0.5  # only the important deltas are taken
    _loads_and_generates(out)


@pytest.mark.parametrize(("method", "params"), [("model_stock", ""), ("sce", "parameters: {select_topk: 0.5}"),
                                                ("karcher", ""), ("nuslerp", "")])
def test_other_new_methods_run_end_to_end(four_layer, tmp_path, method, params):
    m = four_layer
    weights = "\n    parameters: {weight: 1.0}" if method == "nuslerp" else ""
    out = _merge(tmp_path, method, f"""\
models:
  - model: {m['a']}{weights}
  - model: {m['b']}{weights}
merge_method: {method}
base_model: {m['base']}
{params}
dtype: float32
""")
    _loads_and_generates(out)


def test_each_slice_reads_its_own_source_parameters(four_layer):
    """The same models in two slices with different weights: each output layer uses its slice's."""
    from umm.merge import MergeRecipe
    from umm.merge.run import merge_state_dict

    m = four_layer
    recipe = MergeRecipe.from_yaml(f"""\
slices:
  - sources:
      - {{model: {m['a']}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}
      - {{model: {m['b']}, layer_range: [0, 2], parameters: {{weight: 0.0}}}}
  - sources:
      - {{model: {m['a']}, layer_range: [2, 4], parameters: {{weight: 0.25}}}}
      - {{model: {m['b']}, layer_range: [2, 4], parameters: {{weight: 0.75}}}}
merge_method: linear
dtype: float32
""")
    got = merge_state_dict(recipe, threads=1)
    a, b = _tensors(m["a"]), _tensors(m["b"])
    leaf = "self_attn.o_proj.weight"
    torch.testing.assert_close(got[f"model.layers.1.{leaf}"], a[f"model.layers.1.{leaf}"], rtol=0, atol=0)
    want = 0.25 * a[f"model.layers.3.{leaf}"] + 0.75 * b[f"model.layers.3.{leaf}"]
    torch.testing.assert_close(got[f"model.layers.3.{leaf}"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["lm_head.weight"], 0.25 * a["lm_head.weight"] + 0.75 * b["lm_head.weight"],
                               rtol=0, atol=1e-6)  # post weights: the last slice's parameters
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])  # first slice's


def test_partial_layer_ranges_are_checked_against_the_models(four_layer, tmp_path):
    m = four_layer
    path = tmp_path / "r.yml"
    path.write_text(f"""\
slices:
  - sources: [{{model: {m['a']}, layer_range: [2, 6]}}]
merge_method: passthrough
""")
    res = runner.invoke(app, ["merge", str(path), str(tmp_path / "out")])
    assert res.exit_code != 0
    assert "goes past the model's 4 layers" in res.output
    assert not (tmp_path / "out").exists()
