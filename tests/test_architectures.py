"""Every common architecture, end to end: merge, load, generate, merge in memory, admit.

One matrix over tiny random models (2 layers, hidden 32, a 256-token byte-level BPE) of Llama,
Mistral, Qwen2, Qwen3, Gemma2, Gemma3 (text), Phi3, GPT-NeoX, Mixtral and Qwen2-MoE, each built
from its transformers config class and saved with ``save_pretrained``. Between them they cover
tied embeddings (Qwen2, Qwen3, Gemma2, Gemma3), an untied ``lm_head`` (Llama, Mistral, Phi3,
Mixtral, Qwen2-MoE; GPT-NeoX's ``embed_out``, which transformers renames on load), biases (Qwen2's
and Qwen2-MoE's q/k/v, every GPT-NeoX linear and norm), fused projections (Phi3), MoE experts
that transformers fuses into stacked parameters on load (Mixtral, Qwen2-MoE), and checkpoints saved
by older transformers versions with buffers today's drop on load (Llama's per-layer
``rotary_emb.inv_freq``, GPT-NeoX's ``attention.bias``/``masked_bias`` as in Pythia).

For each: ``umm merge`` (linear with a layer gradient, which also checks layer numbering, and
TIES) of two fine-tune-like perturbations onto the base; every output loads with
``AutoModelForCausalLM`` and generates; evolve's in-memory apply (:class:`LiveMerge`) gives the
disk merge's tensors and logits; every output passes admission. Models umm cannot run are refused
before any work, with the reason.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from umm.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only wait on a shared machine
PROMPT = torch.tensor([[1, 40, 41, 42, 43]])


@dataclass(frozen=True)
class Arch:
    """A tiny config of one architecture: its transformers config class and what it covers."""

    config_class: str
    options: dict[str, Any] = field(default_factory=dict)
    tied: bool = False
    gqa: bool = True  # num_key_value_heads < num_attention_heads
    #: buffers that older transformers versions saved with the weights (and today's drop on load)
    stale: Callable[[], dict[str, torch.Tensor]] | None = None


def _inv_freq() -> dict[str, torch.Tensor]:
    return {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": 1e4 ** -(torch.arange(0, 8, 2) / 8) for i in range(2)}


def _neox_masks() -> dict[str, torch.Tensor]:
    causal = torch.ones(1, 1, 64, 64, dtype=torch.bool).tril()
    return {name: t.clone() for i in range(2) for name, t in ((f"gpt_neox.layers.{i}.attention.bias", causal),
                                                              (f"gpt_neox.layers.{i}.attention.masked_bias",
                                                               torch.tensor(-1e9)))}


ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaConfig"),
    "mistral": Arch("MistralConfig", {"sliding_window": 4}),
    "qwen2": Arch("Qwen2Config", tied=True),  # q/k/v biases
    "qwen3": Arch("Qwen3Config", {"head_dim": 8}, tied=True),  # q/k norms
    "gemma2": Arch("Gemma2Config", {"head_dim": 8, "sliding_window": 4}, tied=True),
    "gemma3_text": Arch("Gemma3TextConfig", {"head_dim": 8, "sliding_window": 4}, tied=True),
    "phi3": Arch("Phi3Config"),  # fused qkv_proj and gate_up_proj
    "gpt_neox": Arch("GPTNeoXConfig", gqa=False),  # biases everywhere, embed_out renamed on load
    # as saved by transformers 4.x (Llama-1/2 conversions, Pythia): the stale buffers are merged, admitted, dropped on load
    "llama+inv_freq": Arch("LlamaConfig", stale=_inv_freq),
    "gpt_neox+masks": Arch("GPTNeoXConfig", gqa=False, stale=_neox_masks),
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


def _save(model: Any, tokenizer: Any, folder: Path, stale: dict[str, torch.Tensor] | None) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if stale:
        from safetensors.torch import load_file, save_file

        save_file({**load_file(folder / "model.safetensors"), **stale}, folder / "model.safetensors", {"format": "pt"})
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

    arch = ARCHS[name]
    tokenizer = make_tokenizer(256)
    stale = arch.stale() if arch.stale else None
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # buffers the constructor draws
    model = AutoModelForCausalLM.from_config(_config(arch, tokenizer))
    with torch.no_grad(), transformers_bars_off():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        base = _save(model, tokenizer, root / "base", stale)
        weights = [(p, p.clone()) for p in model.parameters()]
        tuned = []
        for i in (1, 2):
            for p, w in weights:
                p.copy_(w + torch.randn(p.shape, generator=gen) * 0.01)
            tuned.append(_save(model, tokenizer, root / f"ft{i}", stale))
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        family = _build_family(request.param, root)
    finally:
        torch.set_num_threads(threads)
    recipes, outputs = {}, {}
    for method, params in RECIPES.items():
        recipes[method] = root / f"{method}.yaml"
        recipes[method].write_text(_recipe(family, method, **params))
        outputs[method] = root / f"merged-{method}"
        res = runner.invoke(app, ["merge", str(recipes[method]), str(outputs[method]), "--threads", "1"])
        assert res.exit_code == 0, res.output
    return Merged(family, recipes, outputs)


@functools.cache
def _load(folder: Path) -> Any:
    """``AutoModelForCausalLM`` of a merged folder, loaded once per session (tests only read it)."""
    from transformers import AutoModelForCausalLM

    from umm.ui import transformers_bars_off

    with transformers_bars_off():
        return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True, trust_remote_code=False).eval()


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
    arch = ARCHS[merged.family.name]
    for method, folder in merged.outputs.items():
        files = _tensors(folder)
        model = _load(folder)
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
    transformers put it in the live model) and the logits equal those of the disk merge; a source
    loaded back is that source."""
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
        with torch.no_grad():
            disk_logits = _load(merged.outputs[method])(PROMPT).logits
            torch.testing.assert_close(model(PROMPT).logits, disk_logits, rtol=1e-4, atol=1e-5, msg=method)
    live.load_source(live.model_paths.index(str(merged.family.ft2)))  # a source, unmerged, back in place
    files = _tensors(merged.family.ft2)
    for name, slot in slots.items():
        torch.testing.assert_close(slot.read(), files[name], rtol=1e-6, atol=1e-8, msg=f"ft2: {name}")


def test_merged_models_pass_admission(merged: Merged) -> None:
    from umm.checkpoints.admission import admit
    from umm.checkpoints.fingerprint import tokenizer_fingerprint

    for folder in merged.outputs.values():
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


# --- placement of checkpoint tensors in a live model (the conversions the matrix does not meet) ---

class _Two(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(12.0).view(3, 4))
        self.v = torch.nn.Parameter(torch.zeros(2))


def _slots_with(monkeypatch: pytest.MonkeyPatch, convert_w: Any) -> dict[str, Any]:
    """:func:`checkpoint_slots` of :class:`_Two` whose reverse conversion maps ``w`` to the tensors
    ``convert_w(w)`` returns (name -> tensor) and keeps ``v``, as transformers does: on whichever
    parameters it is given."""
    from umm.checkpoints import placement

    def revert(model: Any, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**({} if "w" not in sd else convert_w(sd["w"])), **{k: t for k, t in sd.items() if k != "w"}}

    monkeypatch.setattr(placement, "_revert", lambda: revert)
    return placement.checkpoint_slots(_Two())


def test_a_transposed_or_split_parameter_is_written_where_it_belongs(monkeypatch: pytest.MonkeyPatch) -> None:
    slots = _slots_with(monkeypatch, lambda w: {"w.T": w.T})
    t = slots["w.T"]
    assert t.index is not None and t.shape == (4, 3) and slots["v"].view is not None
    value = torch.randn(4, 3)
    t.write(value)
    assert torch.equal(t.param.data, value.T) and torch.equal(t.read(), value)
    slots = _slots_with(monkeypatch, lambda w: {"top": w[:1], "rest": w[1:]})
    assert slots["top"].view is not None and slots["rest"].view is not None and slots["rest"].shape == (2, 4)
    w = slots["top"].param
    w.data = w.data.clone()  # as model.to(device) does: the slots follow the parameter's new storage
    slots["rest"].write(torch.full((2, 4), -1.0))
    assert torch.equal(w.data[0], torch.arange(4.0)) and bool((w.data[1:] == -1).all())
    assert torch.equal(slots["rest"].read(), torch.full((2, 4), -1.0))


@pytest.mark.parametrize(("convert_w", "words"), [
    (lambda w: {"a": w, "b": w}, "'w' has 12 entries but its checkpoint tensors hold 24"),
    (lambda w: {}, "'w' has 12 entries but its checkpoint tensors hold 0"),
    (lambda w: {"a": w[:2], "b": w[1:]}, "has 12 entries but its checkpoint tensors hold 16"),
    (lambda w: {"a": w[:2], "b": w[1].flip(0)}, "land twice on some entries of 'w' and never on others"),
    (lambda w: {"a": w.reshape(-1)[[0, 0, *range(2, 12)]]}, "land twice on some entries of 'w'"),
], ids=["duplicated", "dropped", "overlapping", "overlapping-same-count", "repeated-entry"])
def test_a_conversion_that_is_not_one_to_one_is_refused(monkeypatch: pytest.MonkeyPatch, convert_w: Any,
                                                        words: str) -> None:
    from umm.checkpoints import placement

    with pytest.raises(placement.PlacementError, match=words):
        _slots_with(monkeypatch, convert_w)


def test_a_conversion_mixing_parameters_or_failing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from umm.checkpoints import placement

    monkeypatch.setattr(placement, "_revert", lambda: lambda model, sd: {"wv": torch.cat([sd["w"].reshape(-1), sd["v"]])})
    with pytest.raises(placement.PlacementError, match="mixes entries of several live parameters"):
        placement.checkpoint_slots(_Two())

    def broken(model: Any, sd: dict) -> dict:
        raise KeyError("experts")

    monkeypatch.setattr(placement, "_revert", lambda: broken)
    with pytest.raises(placement.PlacementError, match="cannot map _Two's parameters back.*KeyError"):
        placement.checkpoint_slots(_Two())
