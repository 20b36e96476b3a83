"""``linear``: weighted average of the models (mergekit's ``LinearMerge``).

Formula, for models θ₁..θₙ with per-model ``weight`` wᵢ (required)::

    result = Σᵢ wᵢ θᵢ                  (normalize: false)
    result = (Σᵢ wᵢ θᵢ) / Σᵢ wᵢ        (normalize: true, the default)

There is no base: when a recipe names a ``base_model`` for ``linear``, mergekit adds the base
as one more input whose weight must come from the recipe; the recipe layer does the same, so
``tensors`` here holds every source. Computed in float32 with the weight sum in float32, as
the released mergekit (0.1.5) does; mergekit then rounds to the input dtype, umm returns float32. A zero weight sum with ``normalize`` is an error
here (mergekit silently writes inf/NaN). Elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, MergeParameterError

#: Elements per pass of the accumulation: 256 Ki float32 (1 MiB) stay in cache across the passes.
_SUB_BLOCK = 256 * 1024


def _linear(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not tensors:
        raise MergeParameterError("linear: nothing to merge (no models)")
    weights = [float(p["weight"]) for p in tensor_params]
    total = None
    if global_params["normalize"]:
        total = torch.tensor(weights, dtype=torch.float32).sum()
        if total == 0:
            raise MergeParameterError(
                "linear: the weights sum to 0, so normalize would divide by zero; "
                "change the weights or set normalize: false"
            )
        total = total.to(tensors[0].device)
    first = tensors[0]
    out = torch.empty(first.shape, dtype=torch.float32, device=first.device)
    flat_out = out.view(-1)
    flats = [x.reshape(-1) for x in tensors]
    # mergekit's order and rounding: 0 + w1*x1, + w2*x2, ..., / sum(w) (float32 throughout);
    # one cache-sized slice at a time, so the passes over it do not go back to memory.
    for s in range(0, flat_out.numel(), _SUB_BLOCK):
        acc = flat_out[s : s + _SUB_BLOCK].zero_()
        for x, w in zip(flats, weights):
            acc.add_(x[s : s + _SUB_BLOCK], alpha=w)
        if total is not None:
            acc.div_(total)
    return out


LINEAR = MergeMethod(
    name="linear",
    requires_base=False,
    tensor_params={"weight": None},
    global_params={"normalize": True},
    random=False,
    elementwise=True,
    fn=_linear,
    propagates_nonfinite=True,
    summary="weighted average of the models",
    reference_url="https://arxiv.org/abs/2203.05482",
    doc=__doc__ or "",
)
