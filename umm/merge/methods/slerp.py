"""``slerp``: spherical interpolation between the base (t = 0) and one other model (t = 1).

Formula (mergekit's ``slerp``), with v₀ = base and v₁ = the other model, each flattened over
the whole tensor::

    u = v / ‖v‖  (left as v when ‖v‖ <= 1e-8) ;  c = ⟨u₀, u₁⟩
    if |c| > 0.9995:  result = (1 − t) v₀ + t v₁                  # near-colinear: lerp
    else: θ = arccos c ;  result = sin((1 − t) θ)/sin θ · v₀ + sin(t θ)/sin θ · v₁

``t`` is a *global* parameter (required; mergekit reads it from the top-level ``parameters``
only, never per model); it may vary per layer and per tensor through gradients and filters.
Base model required; with no other model the result is the base. Like the released mergekit
(0.1.5) this works in float32 torch (older mergekit went through numpy); the dot product is
clamped to [-1, 1] and the coefficients are computed in float64 here, so results agree to
float32 rounding. Not elementwise (norms of the whole tensor).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, MergeParameterError, as_float32

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, dot: float) -> tuple[float, float]:
    """The factors (s₀, s₁) of v₀ and v₁ for the normalised dot product ``dot``."""
    if abs(dot) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta


def _slerp(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    if base is None:
        raise MergeParameterError("slerp needs a base model (set base_model in the recipe)")
    v0 = as_float32(base)
    if not tensors:
        return v0.clone() if v0 is base else v0
    if len(tensors) != 1:
        raise MergeParameterError(f"slerp merges exactly two models (the base and one other), got {len(tensors) + 1}")
    v1 = as_float32(tensors[0])
    t = float(global_params["t"])
    f0, f1 = v0.reshape(-1), v1.reshape(-1)
    n0, n1 = float(torch.linalg.vector_norm(f0)), float(torch.linalg.vector_norm(f1))
    dot = float(torch.dot(f0, f1))
    dot /= (n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0)
    dot = min(1.0, max(-1.0, dot))
    s0, s1 = slerp_coefficients(t, dot)
    return torch.mul(v0, s0).add_(v1, alpha=s1)


SLERP = MergeMethod(
    name="slerp",
    requires_base=True,
    tensor_params={},
    global_params={"t": None},
    random=False,
    elementwise=False,
    fn=_slerp,
    max_sources=1,
    summary="spherical interpolation between the base (t=0) and one model (t=1)",
    reference_url="https://en.wikipedia.org/wiki/Slerp",
    doc=__doc__ or "",
)
