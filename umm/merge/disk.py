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
from umm.checkpoints.hub import snapshot_root
from umm.checkpoints.reader import read_json_file
from umm.checkpoints.writer import (
    TOKENIZER_FILES,
    CheckpointWriter,
    TensorSpec,
    check_output_dir,
    model_card,
    parse_size,
)
from umm.errors import UmmError
from umm.merge.chat_template import TEMPLATE_FILES, resolve_chat_template
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
    ref = inputs.folders[inputs.ref_index]
    src = getattr(inputs.recipe, "tokenizer_source", None)
    if src is None or src == "base":
        return ref
    fps = {p: tokenizer_fingerprint(p) for p in inputs.folders}
    if src == "union":
        if len(set(fps.values())) > 1:
            raise IncompatibleCheckpointsError(
                "tokenizer_source: union needs a vocabulary merge, but the models' tokenizers "
                "differ; umm merges identical tokenizers only: use `umm fuse` (distribution fusion) "
                "for heterogeneous models"
            )
        return ref
    path = inputs.folders[inputs.names.index(src)] if src in inputs.names else Path(str(src))
    if not path.is_dir():
        valid = ", ".join(["base", "union", *inputs.names])
        raise UmmError(f"tokenizer_source {src!r} is not a model folder; valid: {valid}")
    if tokenizer_fingerprint(path) != fps[ref]:
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


@dataclass(frozen=True)
class Extras:
    """Everything of the output besides the tensors, built and checked before any tensor is merged
    (a bad chat template or model card must not cost a finished merge): ``texts`` written as
    they are (relative path -> text) and ``copies``, files copied from an input folder."""

    texts: Mapping[str, str]
    copies: tuple[tuple[Path, str], ...]

    def write(self, writer: CheckpointWriter) -> None:
        """Write every file into the writer's (temporary) output folder."""
        for src, name in self.copies:
            writer.copy_files(src, [name], links_within=snapshot_root(src))
        for rel, text in self.texts.items():
            writer.write_text(rel, text)


def prepare_extras(inputs: MergeInputs, recipe: Any) -> Extras:
    """Config (with the output dtype), generation config, tokenizer (``tokenizer_source``, and
    ``chat_template`` written into ``tokenizer_config.json``), the recipe, and the model card."""
    ref_dir = inputs.folders[inputs.ref_index]
    tok_dir = _tokenizer_dir(inputs)
    texts: dict[str, str] = {}
    cfg = _updated_config(ref_dir, inputs.out_dtypes)
    if cfg is not None and inputs.stacked:  # layer stacking: the output's own layer count
        cfg = stacked_config(cfg, Layout(inputs.routes, inputs.out_num_layers, inputs.layer_sources, False))
    if cfg is not None:
        texts["config.json"] = json.dumps(cfg, indent=2) + "\n"
    tok_files = [n for n in TOKENIZER_FILES if (tok_dir / n).is_file()]
    template = resolve_chat_template(getattr(recipe, "chat_template", None), inputs.folders)
    if template is not None:
        tok_files = [n for n in tok_files if n not in (*TEMPLATE_FILES, "tokenizer_config.json")]
        tok_cfg_path = tok_dir / "tokenizer_config.json"
        tok_cfg = read_json_file(tok_cfg_path, "tokenizer_config.json") if tok_cfg_path.is_file() else {}
        if not isinstance(tok_cfg, dict):
            raise UmmError(f"{tok_cfg_path}: is not a JSON object; cannot write the chat template into it")
        tok_cfg["chat_template"] = template
        texts["tokenizer_config.json"] = json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n"
    copies = [(ref_dir, "generation_config.json")] if (ref_dir / "generation_config.json").is_file() else []
    copies += [(tok_dir, n) for n in tok_files]
    recipe_yaml = recipe.to_yaml()
    texts["umm_recipe.yaml"] = recipe_yaml
    texts["mergekit_config.yml"] = recipe_yaml
    texts["README.md"] = model_card(
        method=inputs.method.name,
        sources=inputs.names,
        base_model=inputs.base_name,
        recipe=recipe.to_dict(),
        recipe_yaml=recipe_yaml,
        out_dtype=_out_dtypes(inputs),
        version=__version__,
    )
    return Extras(texts, tuple(copies))


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
    ``on_progress`` receives the downloads of hub models (:mod:`umm.checkpoints.hub`) and a bar of
    the output bytes (``merge (METHOD)``), advanced from this thread as blocks are written. The
    config, tokenizer, chat template and model card are built before any tensor
    (:func:`prepare_extras`).
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    max_shard = parse_size(shard_size)
    workers = default_workers(threads)
    the_seed = resolve_seed(seed)
    inputs = open_inputs(recipe, on_progress=on_progress)
    torch_threads = torch.get_num_threads()
    # automatic: workers x torch threads = the cores (more threads would only spin)
    torch.set_num_threads(max(1, threads or (os.cpu_count() or 1) // workers))
    try:
        extras = prepare_extras(inputs, recipe)
        specs = [TensorSpec(n, inputs.out_dtypes[n], inputs.shapes[n]) for n in inputs.tensor_names]
        with CheckpointWriter(out, specs, max_shard_bytes=max_shard, overwrite=overwrite) as writer:
            bar = open_bar(on_progress, inputs.output_bytes, f"merge ({inputs.method.name})", "B")
            try:
                n = merge_tensors(inputs, writer.write_rows, device=device, threads=workers, seed=the_seed,
                                  chunk_bytes=chunk_bytes, on_bytes=bar.advance)
            finally:
                bar.close()
            extras.write(writer)
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
