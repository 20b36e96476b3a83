"""``sce``: select, calculate, erase (SCE, mergekit's ``sce``).

Formula, for base θ₀ and models θ₁..θₙ, over the whole tensor::

    δᵢ = θᵢ − θ₀
    select (select_topk < 1): v = variance of δ₁..δₙ per entry (over models, biased);
        keep the k = int(float32(count_nonzero(v)) · select_topk) entries of largest v in
        every δᵢ, zero the rest (k = 0 or select_topk ≤ 0: everything is zeroed)
    calculate: wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²)      (wᵢ = 1/n when that sum is below 1e-6)
    erase: s = sign(Σᵢ δᵢ) with 0 counted as + ;  mᵢ = [sign(δᵢ) = s]  (zero entries never count)
    result = θ₀ + Σᵢ mᵢ wᵢ δᵢ / max(Σᵢ mᵢ wᵢ, 1e-6)

Global parameters ``select_topk`` (1.0) and ``int8_mask`` (false; only the dtype of mergekit's
mask, no effect on the result). No per-model parameter. Base model required. Computed in
float32; equal variances at the cut are broken by ``torch.topk`` as in mergekit. Not
elementwise (whole-tensor variance ranks and means).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, as_float32, base_float32, unchanged_base

WEIGHT_EPS = 1e-6


def select_mask(deltas: torch.Tensor, select_topk: float) -> torch.Tensor:
    """Boolean mask (one entry per tensor entry) of the ``k`` entries of largest variance over models."""
    if select_topk <= 0:
        return torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
    var = torch.var(deltas, dim=0, unbiased=False)
    nonzero = torch.count_nonzero(var).to(torch.float32)
    k = int(nonzero * torch.tensor(select_topk, dtype=torch.float32))  # mergekit rounds in float32
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=deltas.device)
    if k > 0:
        mask[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = True
    return mask.view(var.shape)


def _sce(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    b = base_float32("sce", base)
    if not tensors:
        return unchanged_base(b, base)  # type: ignore[arg-type]
    deltas = torch.stack([as_float32(x) - b for x in tensors])
    topk = float(global_params["select_topk"])
    if topk < 1:
        deltas.mul_(select_mask(deltas, topk))
    sq = deltas.pow(2).reshape(len(tensors), -1).mean(dim=1)
    total = float(sq.sum())
    w = torch.full_like(sq, 1.0 / len(tensors)) if abs(total) < WEIGHT_EPS else sq / total
    sign = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0)
    keep = torch.sign(deltas) == sign
    kept_w = keep * w.view(-1, *([1] * (deltas.dim() - 1)))
    merged = (deltas * kept_w).sum(dim=0) / kept_w.sum(dim=0).clamp(min=WEIGHT_EPS)
    return merged.add_(b)


SCE = MergeMethod(
    name="sce",
    requires_base=True,
    tensor_params={},
    global_params={"int8_mask": False, "select_topk": 1.0},
    random=False,
    elementwise=False,
    fn=_sce,
    search_refusal="sce has no per-model parameter (its weights come from the task vectors)",
    summary="variance top-k select, task-vector-energy weights, sign erase",
    reference_url="https://arxiv.org/abs/2408.07990",
    doc=__doc__ or "",
)
