"""The merge to disk (``umm merge``): run a recipe and publish the merged model folder atomically.

:func:`merge` checks the output folder, opens the inputs (:func:`~umm.merge.inputs.open_inputs`),
streams every merged block into :class:`~umm.checkpoints.writer.CheckpointWriter` through
:func:`~umm.merge.run.merge_tensors`, and adds what makes the folder a model: ``config.json``
with the output dtype, the tokenizer (``tokenizer_source``), the recipe and a model card.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from umm import __version__
from umm.checkpoints.errors import IncompatibleCheckpointsError
from umm.checkpoints.fingerprint import tokenizer_fingerprint
from umm.checkpoints.writer import (
    TOKENIZER_FILES,
    CheckpointWriter,
    TensorSpec,
    check_output_dir,
    model_card,
    parse_size,
)
from umm.errors import UmmError
from umm.merge.dtypes import dtype_name
from umm.merge.inputs import MergeInputs, open_inputs
from umm.merge.layout import Layout, stacked_config
from umm.merge.plan import DEFAULT_CHUNK_BYTES
from umm.merge.run import default_workers, merge_tensors, resolve_seed
from umm.progress import ProgressSink, open_bar


@dataclass(frozen=True)
class MergeSummary:
    """What a merge did: where, what, how long, how much memory and disk."""

    out_dir: Path
    method: str
    models: tuple[str, ...]
    base_model: str | None
    num_tensors: int
    output_bytes: int
    shards: int
    out_dtype: str
    device: str
    threads: int
    seed: int
    wall_s: float
    peak_rss_bytes: int


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _tokenizer_dir(inputs: MergeInputs) -> Path:
    """The folder whose tokenizer files are copied (``tokenizer_source``: base/union/<model>)."""
    ref = Path(inputs.names[inputs.ref_index])
    src = getattr(inputs.recipe, "tokenizer_source", None)
    if src is None or src == "base":
        return ref
    fps = {p: tokenizer_fingerprint(p) for p in inputs.names}
    if src == "union":
        if len(set(fps.values())) > 1:
            raise IncompatibleCheckpointsError(
                "tokenizer_source: union needs a vocabulary merge, but the models' tokenizers "
                "differ; umm merges identical tokenizers only: use `umm fuse` (distribution fusion) "
                "for heterogeneous models"
            )
        return ref
    path = Path(str(src))
    if not path.is_dir():
        valid = ", ".join(["base", "union", *inputs.names])
        raise UmmError(f"tokenizer_source {src!r} is not a model folder; valid: {valid}")
    if tokenizer_fingerprint(path) != fps[str(ref)]:
        raise IncompatibleCheckpointsError(
            f"tokenizer_source {src} has a different tokenizer from the merged models; a merge "
            "keeps the models' vocabulary: use `umm fuse` (distribution fusion) to change tokenizers"
        )
    return path


def _updated_config(ref_dir: Path, out_dtypes: Mapping[str, torch.dtype]) -> dict[str, Any] | None:
    """The reference model's ``config.json`` with the output dtype (``None`` if it has none)."""
    cfg_path = ref_dir / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    float_dtypes = {d for d in out_dtypes.values() if d.is_floating_point}
    if len(float_dtypes) == 1:
        name = dtype_name(next(iter(float_dtypes)))
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = name
        cfg["dtype"] = name
    return cfg


def _out_dtypes(inputs: MergeInputs) -> str:
    """The output dtypes, as written in the summary and the model card (``"bfloat16"``)."""
    return ", ".join(sorted({dtype_name(d) for d in inputs.out_dtypes.values()}))


def _write_extras(writer: CheckpointWriter, inputs: MergeInputs, tok_dir: Path, recipe_yaml: str) -> None:
    """Everything besides the tensors: config, generation config, tokenizer, recipe, model card."""
    ref_dir = Path(inputs.names[inputs.ref_index])
    cfg = _updated_config(ref_dir, inputs.out_dtypes)
    if cfg is not None and inputs.stacked:  # layer stacking: the output's own layer count
        cfg = stacked_config(cfg, Layout(inputs.routes, inputs.out_num_layers, inputs.layer_sources, False))
    if cfg is not None:
        writer.write_json("config.json", cfg)
    writer.copy_files(ref_dir, ["generation_config.json"])
    writer.copy_files(tok_dir, TOKENIZER_FILES)
    writer.write_text("umm_recipe.yaml", recipe_yaml)
    writer.write_text("mergekit_config.yml", recipe_yaml)
    writer.write_text("README.md", model_card(
        method=inputs.method.name,
        sources=inputs.names,
        base_model=inputs.base_name,
        parameters=inputs.recipe.to_dict().get("parameters", {}),  # plain values (filter rules as dicts)
        recipe_yaml=recipe_yaml,
        out_dtype=_out_dtypes(inputs),
        version=__version__,
    ))


def merge(
    recipe: Any,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    shard_size: int | str = "5GB",
    overwrite: bool = False,
    on_progress: ProgressSink | None = None,
    seed: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> MergeSummary:
    """Run ``recipe`` and write the merged model folder to ``out_dir`` (atomically).

    Checks (before merging): the output folder (refused if it exists and is not empty, unless
    ``overwrite``), the recipe, that every model exists, is safetensors, and is compatible with
    the others. During: every input block is checked for NaN/Inf (for methods that carry
    NaN/Inf into their result, by screening the result). Any failure removes the temporary
    output; with ``overwrite`` the old folder stays until the new one is complete.

    ``threads``: worker threads, also torch's thread count (default: up to 4 workers by CPU
    count, with the cores shared out between them as torch threads); restored on return.
    ``on_progress`` receives a bar of the output bytes (``merge (METHOD)``), advanced from this
    thread as blocks are written.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    max_shard = parse_size(shard_size)
    workers = default_workers(threads)
    the_seed = resolve_seed(seed)
    inputs = open_inputs(recipe)
    torch_threads = torch.get_num_threads()
    # automatic: workers x torch threads = the cores (more threads would only spin)
    torch.set_num_threads(max(1, threads or (os.cpu_count() or 1) // workers))
    try:
        tok_dir = _tokenizer_dir(inputs)
        specs = [TensorSpec(n, inputs.out_dtypes[n], inputs.shapes[n]) for n in inputs.tensor_names]
        recipe_yaml = recipe.to_yaml()
        with CheckpointWriter(out, specs, max_shard_bytes=max_shard, overwrite=overwrite) as writer:
            bar = open_bar(on_progress, inputs.output_bytes, f"merge ({inputs.method.name})", "B")
            try:
                n = merge_tensors(inputs, writer.write_rows, device=device, threads=workers, seed=the_seed,
                                  chunk_bytes=chunk_bytes, on_bytes=bar.advance)
            finally:
                bar.close()
            _write_extras(writer, inputs, tok_dir, recipe_yaml)
            writer.finalize()
            shards = len(writer.plan.files)
    finally:
        inputs.close()
        torch.set_num_threads(torch_threads)
    return MergeSummary(
        out_dir=out.absolute(), method=inputs.method.name, models=tuple(inputs.names),
        base_model=inputs.base_name, num_tensors=n, output_bytes=inputs.output_bytes, shards=shards,
        out_dtype=_out_dtypes(inputs), device=str(device), threads=workers, seed=the_seed,
        wall_s=time.perf_counter() - t0, peak_rss_bytes=peak_rss_bytes(),
    )
