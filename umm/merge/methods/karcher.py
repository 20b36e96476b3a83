"""``karcher``: the Riemannian (Karcher) mean of the models on the unit sphere, rescaled
(mergekit's ``karcher``).

Formula, for models θ₁..θₙ (every listed model, the base too if named), each flattened, with
equal weights aᵢ = 1/n::

    nᵢ = ‖θᵢ‖ ;  uᵢ = θᵢ / nᵢ   (models with nᵢ ≤ tol are left out of the mean; none left: 0)
    α = the remaining aᵢ, renormalised to sum 1
    u = Σ αᵢ uᵢ / ‖Σ αᵢ uᵢ‖      (the first uᵢ when that norm is < tol)
    repeat max_iter times:
        T = Σ αᵢ · θᵢ'/sin θᵢ' · (uᵢ − cᵢ u)   over i with θᵢ' = arccos(clamp(cᵢ, −1, 1)) ≥ tol,
            where cᵢ = ⟨u, uᵢ⟩
        stop if ‖T‖ < tol
        u = cos‖T‖ · u + sin‖T‖ · T/‖T‖ ;  u = u/‖u‖ (if ‖u‖ > tol)
    result = (Σᵢ aᵢ nᵢ) · u

Global parameters ``max_iter`` (10) and ``tol`` (1e-5). No per-model parameter and no base
(a named base is one more input, as for ``linear``). Computed in float32. Not elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, MergeParameterError, as_float32


def karcher_mean(tensors: Sequence[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The rescaled Karcher mean of float32 ``tensors`` (see the module docstring)."""
    if len(tensors) == 1:
        return tensors[0].clone()
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(x) for x in tensors]  # float32 tensors, as mergekit 0.1.5
    units = [x / n if float(n) > 0 else torch.zeros_like(x) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    us = [units[i].reshape(-1) for i in valid]
    u = torch.zeros_like(us[0])
    for ai, ui in zip(a, us):
        u += ai * ui
    norm_u = torch.linalg.vector_norm(u)
    u = us[0].clone() if float(norm_u) < tol else u / norm_u
    for _ in range(int(max_iter)):
        step = torch.zeros_like(u)
        for ai, ui in zip(a, us):
            c = torch.clamp(torch.dot(u, ui), -1.0, 1.0)
            theta = torch.arccos(c)
            if float(theta) < tol:
                continue
            step += ai * (theta / torch.sin(theta)) * (ui - c * u)
        norm_t = torch.linalg.vector_norm(step)
        if float(norm_t) < tol:
            break
        u = torch.cos(norm_t) * u + torch.sin(norm_t) * (step / norm_t)
        norm = torch.linalg.vector_norm(u)
        if float(norm) > tol:
            u = u / norm
    scale = sum(ai * n for ai, n in zip(alphas, norms))  # a float32 0-d tensor
    return (scale * u).reshape(tensors[0].shape)


def _karcher(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    if not tensors:
        raise MergeParameterError("karcher: nothing to merge (no models)")
    if float(global_params["max_iter"]) < 0:
        raise MergeParameterError("karcher: max_iter must be >= 0")
    return karcher_mean([as_float32(x) for x in tensors], int(global_params["max_iter"]),
                        float(global_params["tol"]))


KARCHER = MergeMethod(
    name="karcher",
    requires_base=False,
    tensor_params={},
    global_params={"max_iter": 10.0, "tol": 1e-5},
    random=False,
    elementwise=False,
    fn=_karcher,
    search_refusal="karcher has no per-model parameter (equal weights on the sphere)",
    summary="Riemannian (Karcher) mean of the models on the unit sphere, rescaled",
    reference_url="https://en.wikipedia.org/wiki/Karcher_mean",
    doc=__doc__ or "",
)
