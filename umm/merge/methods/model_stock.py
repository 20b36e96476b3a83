"""``model_stock``: move from the base towards the models' average by the angle between their
task vectors (Model Stock, mergekit's ``model_stock``).

Formula, for base θ₀ and N ≥ 2 models θ₁..θₙ. Each tensor is one vector (flattened), or with
``filter_wise: true`` one vector per row along the last dimension (a 1-D tensor is one row)::

    δᵢ = θᵢ − θ₀
    cos = mean over pairs i < j of  ⟨δᵢ, δⱼ⟩ / max(‖δᵢ‖ ‖δⱼ‖, 1e-6), clamped to [-1, 1]
    t = N · cos / (1 + (N − 1) · cos)    (t = 0, the base, where |1 + (N − 1) · cos| < 1e-6)
    result = t · (Σᵢ θᵢ / N) + (1 − t) · θ₀

Global parameter ``filter_wise`` (false). No per-model parameter (mergekit has no weights
here). Base model required, and at least two other models (mergekit's "base plus two+
others"). Computed in float32. Not elementwise (norms of the whole tensor or row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, MergeParameterError, as_float32, base_float32, unchanged_base

NORM_EPS = 1e-6
SINGULAR_EPS = 1e-6


def _model_stock(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    w0 = base_float32("model_stock", base)
    if not tensors:
        return unchanged_base(w0, base)  # type: ignore[arg-type]
    if len(tensors) < 2:
        raise MergeParameterError("model_stock needs at least two models besides the base")
    shape = w0.shape
    if global_params["filter_wise"]:
        view = (lambda x: x.reshape(1, -1)) if w0.dim() <= 1 else (lambda x: x)
    else:
        view = (lambda x: x.reshape(-1))  # noqa: E731
    b = view(w0)
    ws = [view(as_float32(x)) for x in tensors]
    offsets = [w - b for w in ws]
    cos_pairs = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cos_pairs.append((dot / norms.clamp(min=NORM_EPS)).clamp(-1, 1))
    cos = torch.stack(cos_pairs).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS  # opposing updates: keep the base there
    t = torch.where(singular, 0.0, (n * cos) / torch.where(singular, 1.0, denominator))
    avg = ws[0].clone()
    for w in ws[1:]:
        avg.add_(w)
    avg.div_(n)
    return (t * avg + (1 - t) * b).reshape(shape)


MODEL_STOCK = MergeMethod(
    name="model_stock",
    requires_base=True,
    tensor_params={},
    global_params={"filter_wise": False},
    random=False,
    elementwise=False,
    fn=_model_stock,
    min_sources=2,
    search_refusal="model_stock has no per-model parameter: its interpolation comes from the models themselves",
    summary="interpolate base -> average of the models by their task vectors' angle",
    reference_url="https://arxiv.org/abs/2403.19522",
    doc=__doc__ or "",
)
