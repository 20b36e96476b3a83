"""``nuslerp``: spherical interpolation of two models (or of their task vectors), per vector
(mergekit's ``nuslerp``).

Formula, for models θ₁, θ₂ with per-model ``weight`` w₁, w₂ and t = w₂ / (w₁ + w₂)
(t = 0.5 when |w₁ + w₂| < 1e-6). With a base θ₀ the task vectors are interpolated::

    v₀, v₁ = θ₁ − θ₀, θ₂ − θ₀   (with a base) ;  θ₁, θ₂  (without)
    vectors: the whole flattened tensor (nuslerp_flatten: true, the default), else each row
             along the last dimension, or each column with nuslerp_row_wise: true
    uᵢ = vᵢ / max(‖vᵢ‖, 1e-7) ;  c = clamp(⟨u₀, u₁⟩, −1, 1) ;  θ = arccos c
    r = (sin((1 − t) θ) v₀ + sin(t θ) v₁) / sin θ ;  r = (1 − t) v₀ + t v₁ where 1 − c² ≤ 1e-16
    result = θ₀ + r  (with a base) ;  r  (without)

Global parameters ``nuslerp_flatten`` (true) and ``nuslerp_row_wise`` (false). Per-model
``weight`` (required). Exactly two models besides the optional base. Computed in float32.
Not elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, MergeParameterError, as_float32

NORM_EPS = 1e-7
SIN_EPS = 1e-8


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """Slerp of ``v0`` → ``v1`` at ``t`` per vector (see the module docstring); float32 in, out."""
    shape = v0.shape
    transpose = not flatten and row_wise and v0.dim() >= 2
    if flatten or v0.dim() == 0:
        a, b = v0.reshape(-1), v1.reshape(-1)
    elif transpose:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_EPS)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= SIN_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))  # (the slerp branch stays finite)
    res = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * a + t * b, res)
    if transpose:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def _nuslerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    if len(tensors) == 1 and base is None:
        return as_float32(tensors[0]).clone()
    if len(tensors) != 2:
        raise MergeParameterError(
            f"nuslerp merges exactly two models (plus an optional base_model), got {len(tensors)}"
        )
    w0, w1 = (float(p["weight"]) for p in tensor_params)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    a, b = as_float32(tensors[0]), as_float32(tensors[1])
    flat, rows = bool(global_params["nuslerp_flatten"]), bool(global_params["nuslerp_row_wise"])
    if base is None:
        return nuslerp_vectors(t, a, b, flatten=flat, row_wise=rows)
    b0 = as_float32(base)
    return nuslerp_vectors(t, a - b0, b - b0, flatten=flat, row_wise=rows).add_(b0)


NUSLERP = MergeMethod(
    name="nuslerp",
    requires_base=False,
    optional_base=True,
    tensor_params={"weight": None},
    global_params={"nuslerp_flatten": True, "nuslerp_row_wise": False},
    random=False,
    elementwise=False,
    fn=_nuslerp,
    min_sources=2,
    max_sources=2,
    summary="slerp of two models (or their task vectors, with a base), per vector",
    reference_url="https://github.com/arcee-ai/mergekit",
    doc=__doc__ or "",
)
