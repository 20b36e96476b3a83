"""The streaming merge executor on tiny real checkpoints: every method, shards, and bad input."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.checkpoints.errors import (
    CheckpointError,
    CorruptCheckpointError,
    IncompatibleCheckpointsError,
    NonFiniteTensorError,
)
from umm.checkpoints.writer import CheckpointWriteError, OutputExistsError
from umm.errors import UmmError
from umm.merge import MergeRecipe, get_method, tensor_generator
from umm.merge.disk import merge
from umm.merge.inputs import open_inputs
from umm.merge.run import merge_state_dict

# Per-method recipe parameters (per model, global), chosen so every code path does real work.
METHOD_PARAMS: dict[str, tuple[dict, dict]] = {
    "linear": ({"weight": 0.6}, {}),
    "task_arithmetic": ({"weight": 0.7}, {"lambda": 0.9}),
    "ties": ({"weight": 0.5, "density": 0.5}, {"normalize": True}),
    "dare_linear": ({"weight": 0.5, "density": 0.6}, {}),
    "dare_ties": ({"weight": 0.5, "density": 0.6}, {}),
    "slerp": ({}, {"t": [0.2, 0.8]}),
    "breadcrumbs": ({"weight": 0.5, "density": 0.8, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ({"weight": 0.5, "density": 0.8, "gamma": 0.05}, {}),
    "della": ({"weight": 0.5, "density": 0.6, "epsilon": 0.1}, {}),
    "della_linear": ({"weight": 0.5, "density": 0.6, "epsilon": 0.1}, {}),
}


def recipe_for(method: str, base: Path, experts: list[Path], **extra) -> MergeRecipe:
    per_model, global_ = METHOD_PARAMS[method]
    if method == "slerp":
        experts = experts[:1]
    data = {
        "merge_method": method,
        **({} if method == "linear" else {"base_model": str(base)}),
        "models": [{"model": str(e), **({"parameters": per_model} if per_model else {})} for e in experts],
        **({"parameters": global_} if global_ else {}),
        **extra,
    }
    return MergeRecipe.from_dict(data)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _forward(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 42, 7]])).logits


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def reference_merge(recipe: MergeRecipe, seed: int = 0) -> dict[str, torch.Tensor]:
    """Whole-tensor merge straight from the method, without the executor."""
    from umm.merge import resolve_tensor_params

    method = get_method(recipe.merge_method)
    models = {p: _load(Path(p)) for p in recipe.model_paths()}
    base_name = recipe.merge_base()
    sources = recipe.source_models()
    ref = models[recipe.base_model or recipe.model_paths()[0]]
    out = {}
    for name in ref:
        params = resolve_tensor_params(recipe, method, name, 2)
        gen = tensor_generator(seed, name) if method.random else None
        out[name] = method.merge(models[base_name][name] if base_name else None,
                                 [models[s][name] for s in sources], params.per_model, params.global_,
                                 generator=gen)
    return out


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_every_method_matches_whole_tensor_merge_and_loads(method, tiny_models, tmp_path):
    recipe = recipe_for(method, tiny_models["base"], [tiny_models["math"], tiny_models["code"]])
    out = tmp_path / "merged"
    # tiny blocks and two threads: element-wise methods are merged in many row blocks out of order
    s = merge(recipe, out, threads=2, chunk_bytes=1024, seed=3)
    got, want = _load(out), reference_merge(recipe, seed=3)
    assert set(got) == set(want) and s.num_tensors == len(want)
    for name in want:
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    logits = _forward(out)
    assert logits.shape == (1, 5, 384) and torch.isfinite(logits).all()
    assert s.output_bytes == sum(t.numel() * 4 for t in want.values()) and s.peak_rss_bytes > 0


def test_output_folder_contents_shards_index_and_dtype(tiny_models, tmp_path):
    recipe = recipe_for("ties", tiny_models["base"], [tiny_models["math"], tiny_models["code"]],
                        out_dtype="bfloat16")
    out = tmp_path / "merged"
    s = merge(recipe, out, shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert s.shards == len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"].values()) == set(shards)
    tensors = {}
    for f in shards:
        part = load_file(out / f)
        assert all(index["weight_map"][n] == f for n in part)
        assert sum(t.numel() * t.element_size() for t in part.values()) <= 40_000 or len(part) == 1
        tensors.update(part)
    assert set(tensors) == set(index["weight_map"])
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert index["metadata"]["total_size"] == s.output_bytes
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md",
              "umm_recipe.yaml", "mergekit_config.yml"):
        assert (out / f).is_file(), f
    assert MergeRecipe.load(out / "umm_recipe.yaml") == recipe
    card = (out / "README.md").read_text()
    assert str(tiny_models["math"]) in card and "ties" in card
    want = reference_merge(recipe)
    for name, t in tensors.items():
        assert torch.equal(t, want[name].to(torch.bfloat16)), name
    assert torch.isfinite(_forward(out)).all()
    assert _leftovers(tmp_path) == []


def test_linear_with_base_listed_and_in_memory_merge_equal_disk(tiny_models, tmp_path):
    recipe = MergeRecipe.from_dict({
        "merge_method": "linear",
        "base_model": str(tiny_models["base"]),
        "models": [{"model": str(tiny_models["math"]), "parameters": {"weight": 0.3}},
                   {"model": str(tiny_models["code"]), "parameters": {"weight": 0.2}}],
        "parameters": {"weight": 0.5},
    })
    merge(recipe, tmp_path / "m", chunk_bytes=2048)
    got = _load(tmp_path / "m")
    mem = merge_state_dict(recipe, threads=2)
    models = [_load(tiny_models[k]) for k in ("math", "code", "base")]
    for name, t in got.items():
        want = (0.3 * models[0][name] + 0.2 * models[1][name] + 0.5 * models[2][name]) / 1.0
        torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7)
        assert torch.equal(mem[name], t)


def test_random_methods_reproducible_by_seed(tiny_models, tmp_path):
    recipe = recipe_for("dare_ties", tiny_models["base"], [tiny_models["math"], tiny_models["code"]])
    a = merge_state_dict(recipe, seed=7, threads=1)
    b = merge_state_dict(recipe, seed=7, threads=2)
    c = merge_state_dict(recipe, seed=8, threads=2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


# ------------------------------------------------------------------------------ bad input


def test_missing_and_truncated_shard_refused_before_any_output(tiny_models, tmp_path):
    from umm.experts.random_models import make_random_llama

    sharded = make_random_llama(tmp_path / "sharded", seed=5, base=tiny_models["base"], max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    recipe = recipe_for("ties", tiny_models["base"], [sharded])
    data = shards[1].read_bytes()
    shards[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(CorruptCheckpointError, match=shards[1].name):
        merge(recipe, tmp_path / "out")
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_shape_mismatch_names_tensor_and_both_models(tiny_models, tmp_path):
    from umm.experts.random_models import make_random_llama

    wide = make_random_llama(tmp_path / "wide", seed=4, vocab_size=400)  # same tokenizer, bigger embedding
    recipe = recipe_for("task_arithmetic", tiny_models["base"], [tiny_models["math"], wide])
    with pytest.raises(IncompatibleCheckpointsError) as exc:
        merge(recipe, tmp_path / "out")
    msg = str(exc.value)
    assert ("embed_tokens" in msg or "lm_head" in msg) and "(400, 64)" in msg and "(384, 64)" in msg
    assert str(tiny_models["base"]) in msg and str(wide) in msg
    assert not (tmp_path / "out").exists()


def test_different_tokenizers_point_to_fusion(tiny_models, tmp_path):
    other = _copy_model(tiny_models["code"], tmp_path / "other-tok")
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(k for k in vocab if len(k) > 1)
    vocab["zz_" + first] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(tok))
    recipe = recipe_for("ties", tiny_models["base"], [tiny_models["math"], other])
    with pytest.raises(IncompatibleCheckpointsError, match="fuse"):
        merge(recipe, tmp_path / "out")
    union = recipe_for("ties", tiny_models["base"], [tiny_models["math"], tiny_models["code"]],
                       tokenizer_source="union")
    merge(union, tmp_path / "union")  # identical tokenizers: union is fine
    assert (tmp_path / "union" / "tokenizer.json").is_file()


def _nan_model(src: Path, dst: Path, tensor: str) -> Path:
    _copy_model(src, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    tensors[tensor].view(-1)[3] = float("nan")
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


def test_nan_input_refused_naming_tensor_and_model(tiny_models, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    bad = _nan_model(tiny_models["code"], tmp_path / "nan-model", name)
    recipe = recipe_for("linear", tiny_models["base"], [tiny_models["math"], bad])
    with pytest.raises(NonFiniteTensorError) as exc:
        merge(recipe, tmp_path / "out", chunk_bytes=1024)
    assert name in str(exc.value) and str(bad) in str(exc.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("method,value", [("linear", float("inf")), ("ties", float("nan"))])
def test_nonfinite_input_refused_by_result_and_input_screens(method, value, tiny_models, tmp_path):
    # linear screens its float32 result (an Inf input makes it Inf/NaN); TIES screens each input
    name = "model.layers.0.self_attn.q_proj.weight"
    bad = _copy_model(tiny_models["code"], tmp_path / "bad-model")
    tensors = load_file(bad / "model.safetensors")
    tensors[name].view(-1)[7] = value
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    recipe = recipe_for(method, tiny_models["base"], [tiny_models["math"], bad])
    with pytest.raises(NonFiniteTensorError) as exc:
        merge(recipe, tmp_path / "out", chunk_bytes=1024)
    assert name in str(exc.value) and str(bad) in str(exc.value)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_finite_inputs_whose_block_sum_overflows_are_merged(tiny_models, tmp_path):
    # every value near float32's max: the screen's sum overflows, the exact check passes
    name = "model.norm.weight"
    models = []
    for key in ("math", "code"):
        m = _copy_model(tiny_models[key], tmp_path / f"big-{key}")
        tensors = load_file(m / "model.safetensors")
        tensors[name].fill_(2e38)  # 0.6 * 2e38 * 2 = 2.4e38 < 3.4e38
        save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})
        models.append(m)
    recipe = recipe_for("linear", tiny_models["base"], models)
    merge(recipe, tmp_path / "out")
    got = _load(tmp_path / "out")[name]
    assert torch.equal(got, reference_merge(recipe)[name]) and torch.isfinite(got).all()


def test_unknown_method_and_parameter_list_valid_ones(tiny_models, tmp_path):
    base, math = str(tiny_models["base"]), str(tiny_models["math"])
    with pytest.raises(UmmError, match="ties") as exc:
        merge(MergeRecipe.from_dict({"merge_method": "tise", "base_model": base, "models": [{"model": math}]}),
              tmp_path / "out")
    assert "linear" in str(exc.value)
    bad_param = MergeRecipe.from_dict({"merge_method": "ties", "base_model": base,
                                       "models": [{"model": math, "parameters": {"weight": 1, "densty": 0.5}}]})
    with pytest.raises(UmmError, match="densty") as exc:
        merge(bad_param, tmp_path / "out")
    assert "density" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_existing_output_refused_unless_overwrite(tiny_models, tmp_path):
    recipe = recipe_for("linear", tiny_models["base"], [tiny_models["math"], tiny_models["code"]])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        merge(recipe, out)
    assert (out / "keep.txt").read_text() == "mine"
    merge(recipe, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_disk_write_failure_leaves_no_output_and_overwrite_keeps_old(tiny_models, tmp_path, monkeypatch):
    recipe = recipe_for("linear", tiny_models["base"], [tiny_models["math"], tiny_models["code"]])
    old = tmp_path / "old"
    merge(recipe, old)
    before = (old / "model.safetensors").read_bytes()

    real, calls = os.pwrite, {"n": 0}

    def full_disk(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        merge(recipe, tmp_path / "new", chunk_bytes=1024)
    assert not (tmp_path / "new").exists()
    calls["n"] = 0
    with pytest.raises(CheckpointWriteError):
        merge(recipe, old, overwrite=True, chunk_bytes=1024)
    monkeypatch.undo()
    assert (old / "model.safetensors").read_bytes() == before
    # a failed overwrite for another reason (NaN input) keeps the old output too
    bad = _nan_model(tiny_models["code"], tmp_path / "nan-model", "model.norm.weight")
    with pytest.raises(NonFiniteTensorError):
        merge(recipe_for("linear", tiny_models["base"], [tiny_models["math"], bad]), old,
              overwrite=True)
    assert (old / "model.safetensors").read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_missing_model_folder_and_cuda_without_gpu(tiny_models, tmp_path):
    recipe = recipe_for("linear", tiny_models["base"], [tmp_path / "nowhere"])
    with pytest.raises(UmmError, match="nowhere"):
        merge(recipe, tmp_path / "out")
    if not torch.cuda.is_available():
        ok = recipe_for("linear", tiny_models["base"], [tiny_models["math"]])
        with pytest.raises(UmmError, match="CUDA"):
            merge(ok, tmp_path / "out", device="cuda")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_open_inputs_plans_layout_from_reference_model(tiny_models):
    recipe = recipe_for("ties", tiny_models["base"], [tiny_models["math"], tiny_models["code"]], dtype="float16")
    inputs = open_inputs(recipe)
    try:
        assert inputs.names[0] == str(tiny_models["base"]) and inputs.base_index == 0
        assert inputs.merge_indices == [1, 2] and inputs.num_layers == 2
        assert set(inputs.out_dtypes.values()) == {torch.float16}
    finally:
        inputs.close()


def _quantised_expert(base: Path, dst: Path, seed: int) -> Path:
    """base + a few distinct delta values: masses of exact magnitude ties at every threshold."""
    _copy_model(base, dst)
    f = dst / "model.safetensors"
    tensors = load_file(f)
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if t.is_floating_point():
            tensors[name] = t + torch.randint(-2, 3, t.shape, generator=g).to(t.dtype) / 64
    save_file(tensors, f, metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_sparsified_methods_are_merged_in_prepared_row_blocks_exactly(method, tiny_models, tmp_path):
    from umm.merge.plan import plan_jobs

    experts = [_quantised_expert(tiny_models["base"], tmp_path / f"q{i}", seed=i) for i in range(2)]
    recipe = recipe_for(method, tiny_models["base"], experts, parameters={"rescale": True})
    inputs = open_inputs(recipe)
    try:
        jobs = plan_jobs(inputs, chunk_bytes=4096)
    finally:
        inputs.close()
    embed = [j for j in jobs if j.name == "model.embed_tokens.weight"]
    assert embed[0].kind == "prepare" and len(embed) > 3  # a prepare job, then its row blocks
    assert all(j.uses_state and j.kind == "merge" for j in embed[1:])
    # blocks of 16 rows (1024 entries): ties at each model's cut straddle block boundaries
    s = merge(recipe, tmp_path / "out", threads=2, chunk_bytes=4096)
    got, want = _load(tmp_path / "out"), reference_merge(recipe)
    assert s.num_tensors == len(want)
    for name in want:
        assert torch.equal(got[name].view(torch.int32), want[name].view(torch.int32)), name
