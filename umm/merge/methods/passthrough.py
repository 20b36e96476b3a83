"""``passthrough``: copy one model's tensor unchanged, optionally scaled (mergekit's ``passthrough``).

Formula, for the single model θ feeding this tensor with per-model ``scale`` s (default 1)::

    result = s · θ

It is what layer stacking ("frankenmerges") uses: a ``slices:`` recipe where each slice names
one model and a ``layer_range``; the output layers are the slices' layers one after the other,
renumbered from 0, and ``num_hidden_layers`` of the written config is their count (see
:mod:`umm.merge.layout`). Exactly one model per tensor; no base. Elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, MergeParameterError, fresh_float32


def _passthrough(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    if len(tensors) != 1:
        raise MergeParameterError(
            f"passthrough copies exactly one model per tensor, got {len(tensors)}; "
            "give each slice a single source (or use another merge_method)"
        )
    out = fresh_float32(tensors[0])
    scale = float(tensor_params[0]["scale"])
    return out if scale == 1.0 else out.mul_(scale)


PASSTHROUGH = MergeMethod(
    name="passthrough",
    requires_base=False,
    tensor_params={"scale": 1.0},
    global_params={},
    random=False,
    elementwise=True,
    fn=_passthrough,
    propagates_nonfinite=True,
    min_sources=1,
    max_sources=1,
    search_refusal="passthrough copies layers: there is no per-layer parameter to search",
    summary="copy one model's tensors (layer stacking with slices)",
    reference_url="https://github.com/arcee-ai/mergekit",
    doc=__doc__ or "",
)
