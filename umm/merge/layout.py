"""The output layout of a merge: which input tensors make each output tensor (mergekit's slices).

A recipe's ``slices`` (a ``models:`` recipe is one slice of every model over all layers) list,
slice after slice, the layers of the output: output layer ``j`` in slice ``k`` at offset ``o``
is made from layer ``start + o`` of each of the slice's sources, and its tensors are renamed to
layer ``j`` (so stacked layers are numbered 0, 1, ... and the config's ``num_hidden_layers``
is their count). A gradient's position is the layer's offset inside its slice,
``o / (len − 1)`` (1 for a one-layer slice), as mergekit computes it.

Tensors outside the numbered layers come from the first slice's sources when they are
embeddings (names containing ``embed``, ``wte``, ``wpe``) and from the last slice's otherwise
(final norm, ``lm_head``): mergekit's "pre" and "post" weights. They sit at position ``t = 0``.
Within a slice the recipe's base model (when the method uses one) is passed as ``base``; it
must then be one of the slice's sources, with the same layer count.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from umm.merge.params import layer_index

_LAYER_NUM = re.compile(r"((?:^|\.)(?:layers|h|blocks|layer)\.)(\d+)(?=\.|$)")
_PRE = re.compile(r"embed|(?:^|\.)wte\.|(?:^|\.)wpe\.")


@dataclass(frozen=True)
class SliceSource:
    """One model's layers ``[start, end)`` in a slice and the parameter level it brings."""

    model: str
    start: int
    end: int


@dataclass(frozen=True)
class Route:
    """How one output tensor is made: ``(model, input tensor name)`` of the base and of each
    merged model, the slice it belongs to, its gradient position ``t``, and the input whose
    shape, dtype and (for non-float tensors) values the output takes."""

    slice_index: int
    t: float
    base: tuple[str, str] | None
    tensors: tuple[tuple[str, str], ...]
    ref: tuple[str, str]

    @property
    def models(self) -> tuple[str, ...]:
        """The merged models (the ``tensors`` argument of the method), in order."""
        return tuple(m for m, _ in self.tensors)


@dataclass(frozen=True)
class Layout:
    """Every output tensor's :class:`Route`, in output order, and the output's layer count.

    ``layer_sources[j]``: the input layer that output layer ``j`` is made from (first source of
    its slice); ``identity``: every output tensor is the input tensor of the same name.
    """

    routes: dict[str, Route]
    num_layers: int
    layer_sources: tuple[int, ...]
    identity: bool


def rename_layer(name: str, layer: int) -> str:
    """``name`` with its block index replaced by ``layer`` (``model.layers.7.x`` -> ``model.layers.3.x``)."""
    return _LAYER_NUM.sub(lambda m: f"{m.group(1)}{layer}", name, count=1)


def is_pre_weight(name: str) -> bool:
    """Whether a non-layer tensor is an input embedding (taken from the first slice)."""
    return bool(_PRE.search(name))


def _roles(sources: Sequence[str], base: str | None) -> tuple[str | None, list[str]]:
    """The slice's base (when it is one of the sources) and the merged models."""
    if base is not None and base in sources:
        return base, [m for m in sources if m != base]
    return None, list(sources)


def build_layout(
    slices: Sequence[Sequence[SliceSource]],
    base: str | None,
    ref_model: str,
    tensor_names: Sequence[str],
    num_layers: int,
) -> Layout:
    """The layout of ``slices`` over models whose tensors are ``tensor_names`` (with
    ``num_layers`` layers); ``base`` is the model passed as ``base`` (None: none)."""
    identity = len(slices) == 1 and all((s.start, s.end) == (0, num_layers) for s in slices[0])
    by_layer: dict[int, list[str]] = {}
    other: list[str] = []
    for name in tensor_names:
        layer = layer_index(name)
        (by_layer.setdefault(layer, []) if layer is not None else other).append(name)

    def route(k: int, t: float, name_of) -> Route:
        srcs = slices[k]
        b, merged = _roles([s.model for s in srcs], base)
        at = {s.model: name_of(s) for s in srcs}
        ref_m = b if b is not None else (ref_model if identity else merged[0])
        return Route(k, t, (b, at[b]) if b is not None else None, tuple((m, at[m]) for m in merged),
                     (ref_m, at[ref_m]))

    routes: dict[str, Route] = {}
    layer_sources: list[int] = []
    if identity:
        n = num_layers
        for name in tensor_names:
            layer = layer_index(name)
            t = 0.0 if layer is None else (layer / (n - 1) if n > 1 else 1.0)
            routes[name] = route(0, t, lambda s, name=name: name)
        return Layout(routes, num_layers, tuple(range(num_layers)), True)
    for name in other:
        if is_pre_weight(name):
            routes[name] = route(0, 0.0, lambda s, name=name: name)
    for k, srcs in enumerate(slices):
        length = srcs[0].end - srcs[0].start
        for o in range(length):
            j = len(layer_sources)
            layer_sources.append(srcs[0].start + o)
            t = o / (length - 1) if length > 1 else 1.0
            for name in by_layer.get(srcs[0].start + o, []):
                routes[rename_layer(name, j)] = route(
                    k, t, lambda s, name=name, o=o: rename_layer(name, s.start + o))
    for name in other:
        if not is_pre_weight(name):
            routes[name] = route(len(slices) - 1, 0.0, lambda s, name=name: name)
    return Layout(routes, len(layer_sources), tuple(layer_sources), False)


#: config keys holding one entry per layer (Gemma 2/3, Qwen 3, ...): restacked with the layers
PER_LAYER_CONFIG_KEYS = ("layer_types",)


def stacked_config(config: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """``config`` for the output layers of ``layout``: the layer count (``num_hidden_layers`` or
    the key the config uses) and per-layer lists taken from each output layer's input layer."""
    out = dict(config)
    keys = [k for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers") if k in out]
    for key in keys[:1] or ["num_hidden_layers"]:
        out[key] = layout.num_layers
    for key in PER_LAYER_CONFIG_KEYS:
        value = out.get(key)
        if isinstance(value, list) and all(i < len(value) for i in layout.layer_sources):
            out[key] = [value[i] for i in layout.layer_sources]
    return out
