"""Every common architecture, end to end: merge, load, generate, merge in memory, admit.

One matrix over tiny random models (2 layers, hidden 32, a 256-token byte-level BPE) of Llama,
Mistral, Qwen2, Qwen3, Gemma2, Gemma3 (text), Phi3, GPT-NeoX, Mixtral and Qwen2-MoE, each built
from its transformers config class and saved with ``save_pretrained``. Between them they cover
tied embeddings (Qwen2, Qwen3, Gemma2, Gemma3), an untied ``lm_head`` (Llama, Mistral, Phi3,
Mixtral, Qwen2-MoE; GPT-NeoX's ``embed_out``, which transformers renames on load), biases (Qwen2's
and Qwen2-MoE's q/k/v, every GPT-NeoX linear and norm), fused projections (Phi3) and MoE experts
that transformers fuses into stacked parameters on load (Mixtral, Qwen2-MoE).

For each: ``umm merge`` (linear with a layer gradient, which also checks layer numbering, and
TIES) of two fine-tune-like perturbations onto the base; every output loads with
``AutoModelForCausalLM`` and generates; evolve's in-memory apply (:class:`LiveMerge`) gives the
disk merge's tensors and logits; every output passes admission. Models umm cannot run are refused
before any work, with the reason.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from umm.cli import app

runner = CliRunner()
PROMPT = torch.tensor([[1, 40, 41, 42, 43]])


@dataclass(frozen=True)
class Arch:
    """A tiny config of one architecture: its transformers config class and what it covers."""

    config_class: str
    options: dict[str, Any] = field(default_factory=dict)
    tied: bool = False
    gqa: bool = True  # num_key_value_heads < num_attention_heads


ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaConfig"),
    "mistral": Arch("MistralConfig", {"sliding_window": 4}),
    "qwen2": Arch("Qwen2Config", tied=True),  # q/k/v biases
    "qwen3": Arch("Qwen3Config", {"head_dim": 8}, tied=True),  # q/k norms
    "gemma2": Arch("Gemma2Config", {"head_dim": 8, "sliding_window": 4}, tied=True),
    "gemma3_text": Arch("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 4}, tied=True),
    "phi3": Arch("Phi3Config"),  # fused qkv_proj and gate_up_proj
    "gpt_neox": Arch("GPTNeoXConfig", gqa=False),  # biases everywhere, embed_out renamed on load
    "mixtral": Arch("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": Arch("Qwen2MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
                                         "shared_expert_intermediate_size": 24}),
}


def _config(arch: Arch, tokenizer: Any) -> Any:
    import transformers

    sizes = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 64, "tie_word_embeddings": arch.tied,
             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id}
    if arch.gqa:
        sizes["num_key_value_heads"] = 2
    return getattr(transformers, arch.config_class)(**sizes, **arch.options)


def _save(model: Any, tokenizer: Any, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class Family:
    """A base model of one architecture and two fine-tune-like perturbations of it."""

    name: str
    base: Path
    ft1: Path
    ft2: Path


def _build_family(name: str, root: Path) -> Family:
    """Base: every parameter ``0.02·N(0, 1)``; fine-tunes: the base plus ``0.01·N(0, 1)``."""
    from transformers import AutoModelForCausalLM

    from umm.experts.random_models import make_tokenizer
    from umm.ui import transformers_bars_off

    tokenizer = make_tokenizer(256)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # buffers the constructor draws
    model = AutoModelForCausalLM.from_config(_config(ARCHS[name], tokenizer))
    with torch.no_grad(), transformers_bars_off():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        base = _save(model, tokenizer, root / "base")
        tuned = []
        for i in (1, 2):
            ft = AutoModelForCausalLM.from_pretrained(base, use_safetensors=True)
            for p in ft.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            tuned.append(_save(ft, tokenizer, root / f"ft{i}"))
    return Family(name, base, *tuned)


def _recipe(f: Family, method: str, ft1: str, ft2: str, base: str | None = None) -> str:
    """A recipe merging ft1 and ft2 (and the base, when it has ``base`` parameters) onto the base."""
    models = [(f.ft1, ft1), (f.ft2, ft2), *([(f.base, base)] if base else [])]
    listed = "".join(f"  - model: {m}\n    parameters: {p}\n" for m, p in models)
    return f"merge_method: {method}\nbase_model: {f.base}\nmodels:\n{listed}dtype: float32\n"


RECIPES = {
    # layer 0 (and the non-layer tensors, at t = 0) from ft1, layer 1 from ft2
    "linear": {"ft1": "{weight: [1.0, 0.0]}", "ft2": "{weight: [0.0, 1.0]}", "base": "{weight: 0.0}"},
    "ties": {"ft1": "{weight: [0.8, 0.4], density: 0.5}", "ft2": "{weight: 0.6, density: 0.3}"},
}


@dataclass(frozen=True)
class Merged:
    """A family merged with ``umm merge``: recipe file -> output folder, per method."""

    family: Family
    recipes: dict[str, Path]
    outputs: dict[str, Path]


@pytest.fixture(scope="module", params=sorted(ARCHS))
def merged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Merged:
    root = tmp_path_factory.mktemp(request.param)
    family = _build_family(request.param, root)
    recipes, outputs = {}, {}
    for method, params in RECIPES.items():
        recipes[method] = root / f"{method}.yaml"
        recipes[method].write_text(_recipe(family, method, **params))
        outputs[method] = root / f"merged-{method}"
        res = runner.invoke(app, ["merge", str(recipes[method]), str(outputs[method]), "--threads", "1"])
        assert res.exit_code == 0, res.output
    return Merged(family, recipes, outputs)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from umm.checkpoints.reader import Checkpoint

    with Checkpoint.open(folder) as ckpt:
        return dict(ckpt.iter_tensors())


def test_layer_gradients_number_the_layers(merged: Merged) -> None:
    """``weight: [1, 0]`` / ``[0, 1]`` over 2 layers: every tensor of layer 0 and every non-layer tensor is
    ft1's, every tensor of layer 1 is ft2's (expert indices, fused projections and biases are not layers)."""
    from umm.merge.params import layer_index

    out, ft1, ft2 = (_tensors(p) for p in (merged.outputs["linear"], merged.family.ft1, merged.family.ft2))
    assert set(out) == set(ft1)
    layers = {name: layer_index(name) for name in out}
    assert set(layers.values()) == {None, 0, 1}, layers
    for name, t in out.items():
        want = ft2[name] if layers[name] == 1 else ft1[name]
        assert torch.equal(t, want), name


def test_merged_models_load_with_transformers_and_generate(merged: Merged) -> None:
    from transformers import AutoModelForCausalLM

    arch = ARCHS[merged.family.name]
    for method, folder in merged.outputs.items():
        files = _tensors(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=False)
        model.eval()
        out_w = model.get_output_embeddings().weight
        in_w = model.get_input_embeddings().weight
        assert (out_w.data_ptr() == in_w.data_ptr()) == arch.tied, method
        if not arch.tied:  # the untied head is the merged one from the files, not a copy of the embedding
            head = next(n for n in files if n.endswith(("lm_head.weight", "embed_out.weight")))
            assert torch.equal(out_w, files[head]) and not torch.equal(out_w, in_w), method
        with torch.no_grad():
            ids = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
        assert ids.shape == (1, PROMPT.shape[1] + 4) and int(ids.max()) < model.config.vocab_size, method


def test_in_memory_apply_equals_the_disk_merge(merged: Merged) -> None:
    """evolve's LiveMerge on the base, for both recipes: every checkpoint tensor (wherever
    transformers put it in the live model) and the logits equal those of the disk merge."""
    from transformers import AutoModelForCausalLM

    from umm.checkpoints.loading import load_causal_lm
    from umm.checkpoints.placement import checkpoint_slots
    from umm.evolve.apply import LiveMerge
    from umm.merge.recipe import MergeRecipe

    recipes = {m: MergeRecipe.load(p) for m, p in merged.recipes.items()}
    model = load_causal_lm(merged.family.base, device="cpu", dtype="float32")
    live = LiveMerge(recipes["ties"], model, device="cpu", threads=1)
    slots = checkpoint_slots(model)
    for method in ("ties", "linear"):
        live.apply(recipes[method])
        files = _tensors(merged.outputs[method])
        assert set(slots) <= set(files)
        for name, slot in slots.items():
            torch.testing.assert_close(slot.read(), files[name], rtol=1e-5, atol=1e-6, msg=f"{method}: {name}")
        disk = AutoModelForCausalLM.from_pretrained(merged.outputs[method], use_safetensors=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(PROMPT).logits, disk(PROMPT).logits, rtol=1e-4, atol=1e-5,
                                       msg=method)


def test_merged_models_pass_admission(merged: Merged) -> None:
    from umm.checkpoints.admission import admit
    from umm.checkpoints.fingerprint import tokenizer_fingerprint

    for folder in (merged.family.base, *merged.outputs.values()):
        report = admit(folder)
        assert report.fingerprint.model_type == json.loads((folder / "config.json").read_text())["model_type"]
        assert report.fingerprint.tokenizer == tokenizer_fingerprint(merged.family.base)


# --- refused before any work -------------------------------------------------------------------

REFUSALS = {
    "remote_code": ({"auto_map": {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}, "custom model code"),
    "unknown_type": ({"model_type": "totally_new_arch"}, "'totally_new_arch' is unknown"),
    "not_causal_lm": ({"model_type": "t5"}, "not a causal language model"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_unsupported_models_are_refused_before_work_starts(case: str, tiny_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    from umm.checkpoints.errors import UnsupportedModelError
    from umm.checkpoints.loading import load_causal_lm
    from umm.evolve.apply import LiveMerge
    from umm.merge.recipe import MergeRecipe

    edit, words = REFUSALS[case]
    odd = shutil.copytree(tiny_models["math"], tmp_path / case)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, **edit}))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
merge_method: ties
base_model: {tiny_models['base']}
models:
  - model: {odd}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {tiny_models['code']}
    parameters: {{weight: 0.5, density: 0.5}}
""")
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(recipe), str(out)])
    assert res.exit_code == 2, res.output
    assert words in res.output and case in res.output and "Traceback" not in res.output
    assert not out.exists()
    model = load_causal_lm(tiny_models["base"], device="cpu", dtype="float32")
    with pytest.raises(UnsupportedModelError, match=words):
        LiveMerge(MergeRecipe.load(recipe), model)
