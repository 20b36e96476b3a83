"""The genome: layout, vector round trip, and exactness of genome -> recipe -> resolve."""

from __future__ import annotations

import numpy as np
import pytest

from umm.errors import UmmError
from umm.merge import Genome, MergeRecipe, get_method, resolve_tensor_params


def _llama_names(num_layers: int) -> list[str]:
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    names += [f"model.layers.{i}.{p}.weight" for i in range(num_layers) for p in per_layer]
    return names


def _random(genome: Genome, seed: int = 0) -> Genome:
    rng = np.random.default_rng(seed)
    return genome.with_vector(rng.uniform(0.05, 0.95, genome.values.size))


def _assert_recipe_resolves_to_genome(genome: Genome, names: list[str]) -> None:
    recipe = MergeRecipe.from_yaml(genome.to_recipe(dtype="bfloat16").to_yaml())  # through YAML text
    recipe.validate_for_merge()
    method = get_method(genome.method)
    for name in names:
        tp = resolve_tensor_params(recipe, method, name, genome.num_layers)
        assert tp.models == genome.models
        want = genome.value(name)
        for m_idx, _ in enumerate(genome.models):
            for p_idx, p in enumerate(genome.param_names):
                got = tp.per_model[m_idx][p] if p in method.tensor_params else tp.global_[p]
                assert got == pytest.approx(want[m_idx, p_idx], rel=1e-14, abs=1e-15), (name, p)
        for k, v in genome.global_params.items():
            assert tp.global_[k] == v


def test_uniform_start_and_groups():
    g = Genome.uniform("ties", "base", ["a", "b", "c"], num_layers=10, groups=4)
    assert g.param_names == ("weight", "density")
    assert g.values.shape == (4, 3, 2) and g.values.dtype == np.float64
    assert np.allclose(g.values[..., 0], 1 / 3) and np.allclose(g.values[..., 1], 1.0)
    groups = [g.group_of_layer(i) for i in range(10)]
    assert groups == sorted(groups) and set(groups) == {0, 1, 2, 3}
    assert max(groups.count(k) for k in range(4)) - min(groups.count(k) for k in range(4)) <= 1
    assert Genome.uniform("slerp", "base", ["a"], 8, 2).param_names == ("t",)
    assert Genome.uniform("task_arithmetic", "base", ["a"], 8, 2).param_names == ("weight",)
    assert float(Genome.uniform("slerp", "base", ["a"], 8, 2).values.max()) == 0.5
    with pytest.raises(ValueError):
        g.values[0, 0, 0] = 5.0  # immutable


def test_vector_round_trip_and_bounds():
    g = Genome.uniform("dare_ties", "base", ["a", "b"], 6, 3, global_params={"normalize": True})
    v = np.arange(g.values.size, dtype=np.float64)
    h = g.with_vector(v)
    assert np.array_equal(h.to_vector(), v)
    assert h.with_vector(h.to_vector()) == h
    assert h != g and g.to_vector().size == 3 * 2 * 2
    assert h.value("model.layers.5.mlp.up_proj.weight")[1, 0] == h.values[2, 1, 0]
    lo, hi = h.bounds()
    assert lo.shape == v.shape and np.all(lo[1::2] == 0) and np.all(hi[1::2] == 1)  # density in [0, 1]
    with pytest.raises(UmmError, match="vector has 3 values"):
        g.with_vector([1.0, 2.0, 3.0])


def test_genome_recipe_is_exact_for_every_tensor_of_a_tiny_llama():
    # the 21 tensors LlamaForCausalLM(num_hidden_layers=2, tie_word_embeddings=False) saves
    names = _llama_names(2)
    assert len(names) == 21
    for method, groups in (("ties", 2), ("task_arithmetic", 1), ("dare_linear", 2), ("della", 1)):
        g = _random(Genome.uniform(method, "base", ["math", "code"], 2, groups))
        _assert_recipe_resolves_to_genome(g, names)


@pytest.mark.parametrize(("num_layers", "groups"), [(7, 3), (12, 12), (9, 1), (32, 5)])
def test_genome_recipe_is_exact_with_filters(num_layers, groups):
    g = _random(Genome.uniform("breadcrumbs", "base", ["a", "b", "c"], num_layers, groups,
                               ("weight", "density", "gamma"), filters=("self_attn", "mlp"),
                               global_params={"lambda": 0.9, "normalize": True}), seed=num_layers)
    assert g.values.shape == (groups, 3, 3, 3)
    _assert_recipe_resolves_to_genome(g, _llama_names(num_layers))
    back = Genome.from_recipe(g.to_recipe(), num_layers, groups)
    assert back.filters == ("self_attn", "mlp") and back.param_names == g.param_names
    assert back.global_params == {"lambda": 0.9, "normalize": True}
    assert np.allclose(back.values, g.values, rtol=1e-14, atol=0)


def test_non_layer_tensors_follow_group_zero():
    g = _random(Genome.uniform("linear", None, ["a", "b"], 6, 3))
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert np.array_equal(g.value(name), g.values[0])
    _assert_recipe_resolves_to_genome(g, _llama_names(6))


def test_slerp_genome_writes_t_as_a_global_gradient():
    g = Genome.uniform("slerp", "base", ["other"], 8, 4).with_vector([0.1, 0.4, 0.6, 0.9])
    recipe = g.to_recipe()
    assert "t" in recipe.parameters and recipe.models[0].parameters == {}
    _assert_recipe_resolves_to_genome(g, _llama_names(8))
    assert Genome.from_recipe(recipe, 8, 4) == g


def test_from_recipe_of_a_hand_written_recipe_and_inexpressible_ones():
    recipe = MergeRecipe.from_yaml(
        """
merge_method: ties
base_model: base
models:
  - model: base
  - model: a
    parameters: {weight: 0.7, density: [0.5, 0.5, 0.5, 0.9, 0.9, 0.9]}
  - model: b
    parameters: {weight: 0.3}
parameters: {density: 0.6, normalize: false}
"""
    )
    g = Genome.from_recipe(recipe, 6, 2)
    assert g.models == ("a", "b") and g.param_names == ("weight", "density")
    assert g.global_params == {"normalize": False}
    assert g.values[:, 0, 1].tolist() == [0.5, 0.9] and g.values[:, 1, 1].tolist() == [0.6, 0.6]
    with pytest.raises(UmmError, match="inside layer group"):
        Genome.from_recipe(recipe, 6, 3)
    smooth = MergeRecipe.from_yaml(
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: [0, 1]}}, {model: b, parameters: {weight: 1}}]"
    )
    assert Genome.from_recipe(smooth, 2, 2).values[:, 0, 0].tolist() == [0.0, 1.0]
    with pytest.raises(UmmError, match="inside layer group"):
        Genome.from_recipe(smooth, 3, 1)  # 0, 0.5, 1 across the layers of one group
    head = MergeRecipe.from_yaml(
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: lm_head, value: 2}, {value: 1}]}}]"
    )
    assert Genome.from_recipe(head, 4, 2).filters == ("lm_head",)  # a filter set of its own
    layers_only = MergeRecipe.from_yaml(
        "merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: model.layers, value: 2}, "
        "{value: 1}]}}]"
    )
    with pytest.raises(UmmError, match="unreachable|non-layer"):
        Genome.from_recipe(layers_only, 4, 2)  # layers and non-layer tensors differ: not a genome


def test_invalid_genomes_are_rejected():
    with pytest.raises(UmmError, match="needs a base_model"):
        Genome.uniform("ties", None, ["a"], 4, 2)
    with pytest.raises(UmmError, match="groups"):
        Genome.uniform("ties", "base", ["a"], 4, 5)
    with pytest.raises(UmmError, match="no parameter 'dens'"):
        Genome.uniform("ties", "base", ["a"], 4, 2, ("weight", "dens"))
    with pytest.raises(UmmError, match="exactly one model"):
        Genome.uniform("slerp", "base", ["a", "b"], 4, 2)
    with pytest.raises(UmmError, match="shape"):
        Genome("ties", "base", ("a",), 4, 2, ("weight",), np.zeros((2, 2, 1)))
    with pytest.raises(UmmError, match="unknown merge_method"):
        Genome.uniform("nope", "base", ["a"], 4, 2)
