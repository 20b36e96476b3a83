"""What one merge reads: its tensor sources, the models' roles, and the checks before any work.

:func:`open_inputs` validates a recipe, opens every checkpoint (headers only), checks they can be
merged (architecture, shapes, tokenizer) and lays out the output (every tensor's name, shape and
dtype, from the reference model and ``out_dtype``) as a :class:`MergeInputs`. The same inputs
serve a merge to disk and one in memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from umm.checkpoints.fingerprint import require_compatible
from umm.checkpoints.hub import open_model
from umm.checkpoints.loading import check_model_config
from umm.checkpoints.reader import CONFIG_NAME
from umm.merge.dtypes import parse_dtype
from umm.merge.methods.registry import get_method
from umm.merge.params import resolve_tensor_params
from umm.progress import ProgressSink


class CheckpointSource:
    """Reads blocks of rows of a checkpoint's tensors (:meth:`Checkpoint.get_rows`: ``os.preadv``
    into fresh buffers, never memory-mapped). Thread-safe."""

    def __init__(self, ckpt: Any) -> None:
        self.ckpt = ckpt
        self.path = Path(ckpt.path)

    def read_rows(self, name: str, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` of tensor ``name`` (whole tensor by default), as stored."""
        if start is None or not self.ckpt.tensors[name].shape:
            return self.ckpt.get_tensor(name)
        return self.ckpt.get_rows(name, start, end)

    def close(self) -> None:
        """Nothing to release: the checkpoint's files are closed by :meth:`MergeInputs.close`."""


@dataclass
class MergeInputs:
    """What one merge reads: the method, its models and the tensors to produce.

    ``sources[i]`` / ``names[i]`` are the models in ``recipe.model_paths()`` order;
    ``base_index`` points at the model passed as ``base`` (``None`` for base-less methods);
    ``merge_indices`` are the models passed as ``tensors`` (``recipe.source_models()`` order);
    ``ref_index`` is the model whose config, tokenizer and tensor layout the output takes;
    ``folders[i]`` is the local folder of ``names[i]`` (a hub snapshot for a hub id; the base
    model's folder for ``model+adapter``).
    """

    recipe: Any
    method: Any
    names: list[str]
    sources: list[Any]
    base_index: int | None
    merge_indices: list[int]
    ref_index: int
    num_layers: int
    tensor_names: list[str]
    shapes: dict[str, tuple[int, ...]]
    in_dtypes: dict[str, torch.dtype]
    out_dtypes: dict[str, torch.dtype]
    checkpoints: list[Any] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    #: output tensor name -> its :class:`~umm.merge.layout.Route` (which inputs, which roles)
    routes: dict[str, Any] = field(default_factory=dict)
    #: the output's layers: their count and the input layer each is made from
    out_num_layers: int = 0
    layer_sources: tuple[int, ...] = ()
    #: whether the output layers differ from the inputs' (layer stacking with slices)
    stacked: bool = False

    def tensor_params(self, name: str) -> Any:
        """The resolved :class:`~umm.merge.TensorParams` of output tensor ``name`` (cached)."""
        p = self.params.get(name)
        if p is None:
            p = resolve_tensor_params(self.recipe, self.method, name, self.num_layers, route=self.routes.get(name))
            self.params[name] = p
        return p

    def reads(self, name: str) -> tuple[tuple[int, str] | None, list[tuple[int, str]], tuple[int, str]]:
        """(source index, input tensor name) of output tensor ``name``'s base (None: none), of
        each merged model, and of the input it takes its layout from."""
        route = self.routes[name]
        index = {p: i for i, p in enumerate(self.names)}
        base = (index[route.base[0]], route.base[1]) if route.base is not None else None
        return base, [(index[m], n) for m, n in route.tensors], (index[route.ref[0]], route.ref[1])

    def close(self) -> None:
        """Close every source and checkpoint."""
        for s in self.sources:
            s.close()
        for c in self.checkpoints:
            close = getattr(c, "close", None)
            if close is not None:
                close()

    @property
    def base_name(self) -> str | None:
        """The model passed as ``base`` (``None`` for base-less methods)."""
        return self.names[self.base_index] if self.base_index is not None else None

    @property
    def output_bytes(self) -> int:
        """Bytes of every output tensor in its output dtype."""
        return sum(math.prod(self.shapes[n]) * self.out_dtypes[n].itemsize for n in self.tensor_names)


def _model_roles(recipe: Any) -> tuple[list[str], int | None, list[int], int]:
    """Model paths (base first), index of the ``base`` argument, indices of ``tensors``, reference.

    The reference model (config, tokenizer, output layout) is the ``base_model`` if the recipe
    names one (also for ``linear``, where it is merged as one more input), else the first model.
    """
    paths = list(recipe.model_paths())
    merge_base = recipe.merge_base()
    base_index = paths.index(merge_base) if merge_base is not None else None
    merge_indices = [paths.index(m) for m in recipe.source_models()]
    ref_index = paths.index(recipe.base_model) if recipe.base_model else 0
    return paths, base_index, merge_indices, ref_index


def _open_checkpoints(paths: list[str], on_progress: ProgressSink | None = None) -> list[Any]:
    """Open every model (a folder, a hub id, ``model+adapter``: :func:`umm.checkpoints.hub.open_model`),
    check that transformers can run it (no custom code, a known causal-LM type:
    :func:`~umm.checkpoints.loading.check_model_config`) and that they are compatible; nothing stays
    open on an error."""
    ckpts: list[Any] = []
    try:
        for p in paths:
            ckpts.append(open_model(p, on_progress=on_progress))
            check_model_config(ckpts[-1].config, ckpts[-1].path / CONFIG_NAME)
        if len(ckpts) > 1:
            require_compatible(ckpts)
    except BaseException:
        for c in ckpts:
            c.close()
        raise
    return ckpts


def open_inputs(recipe: Any, *, out_dtype: torch.dtype | None = None,
                on_progress: ProgressSink | None = None) -> MergeInputs:
    """Validate the recipe, open every checkpoint and check they can be merged (before any work).

    Model references may be folders, hub ids (downloaded, progress to ``on_progress``) or
    ``model+adapter`` (:mod:`umm.checkpoints.hub`). Raises :class:`UmmError` subclasses naming the model, file or tensor at fault.
    """
    recipe.validate_for_merge()
    method = get_method(recipe.merge_method)
    paths, base_index, merge_indices, ref_index = _model_roles(recipe)
    ckpts = _open_checkpoints(paths, on_progress)
    ref = ckpts[ref_index]
    out = out_dtype
    if out is None:
        out = parse_dtype(recipe.out_dtype, "out_dtype") or parse_dtype(recipe.dtype, "dtype")
    num_layers = ref.num_layers if ref.num_layers is not None else 0
    try:
        layout = recipe.layout(list(ref.tensors), num_layers, paths[ref_index])
    except BaseException:
        for c in ckpts:
            c.close()
        raise
    names = list(layout.routes)
    in_dtypes = {n: ref.tensors[layout.routes[n].ref[1]].dtype for n in names}
    return MergeInputs(
        recipe=recipe,
        method=method,
        names=paths,
        sources=[CheckpointSource(c) for c in ckpts],
        base_index=base_index,
        merge_indices=merge_indices,
        ref_index=ref_index,
        num_layers=num_layers,
        tensor_names=names,
        shapes={n: tuple(ref.tensors[layout.routes[n].ref[1]].shape) for n in names},
        in_dtypes=in_dtypes,
        out_dtypes={n: (out if out is not None and d.is_floating_point else d) for n, d in in_dtypes.items()},
        checkpoints=ckpts,
        folders=[Path(c.path) for c in ckpts],
        routes=layout.routes,
        out_num_layers=layout.num_layers,
        layer_sources=layout.layer_sources,
        stacked=not layout.identity,
    )
