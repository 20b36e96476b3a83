"""``arcee_fusion``: keep the base except where the other model differs both a lot and in
distribution (mergekit's ``arcee_fusion``).

Formula, for base θ₀ and one model θ₁; rows along the last dimension (a 1-D tensor is one row)::

    p = softmax(θ₁ per row) + 1e-8 ;  q = softmax(θ₀ per row) + 1e-8
    KL = Σ_row p · log(p / q)                       (one value per row)
    s = |θ₁ − θ₀| · KL                               (importance of every entry)
    sorted s over the whole tensor, n entries; at(q) = sorted[int(float32(q) · (n − 1))]
    threshold = at(0.5) + 1.5 · (at(0.75) − at(0.25))   # median + 1.5 IQR
    result = θ₀ + (θ₁ − θ₀) · [s ≥ threshold]

The recipe form (mergekit's example): ``models: [a, b]``, ``base_model: a`` (the base may be
listed). Exactly one model besides the base; no parameters. Computed in float32. mergekit
estimates the quantiles from a random sample of 1,000,000 entries for larger tensors; umm
uses every entry (exact, reproducible), so on such tensors the threshold may differ slightly.
Not elementwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from umm.merge.methods.base import MergeMethod, MergeParameterError, as_float32, base_float32, unchanged_base

EPS = 1e-8


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|x − base|`` times each row's KL divergence of softmax(x) from softmax(base)."""
    p = torch.softmax(x, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1)
    return (x - base).abs() * kl.unsqueeze(-1)


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """median + 1.5 · IQR of ``scores`` at mergekit's truncated quantile indices."""
    flat = scores.reshape(-1)
    n = flat.numel()

    def at(q: float) -> torch.Tensor:
        k = int(torch.tensor(q, dtype=torch.float32) * (n - 1))
        return torch.kthvalue(flat, k + 1).values

    return at(0.5) + 1.5 * (at(0.75) - at(0.25))


def _arcee_fusion(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
) -> torch.Tensor:
    b = base_float32("arcee_fusion", base)
    if not tensors:
        return unchanged_base(b, base)  # type: ignore[arg-type]
    if len(tensors) != 1:
        raise MergeParameterError(f"arcee_fusion merges exactly one model into the base, got {len(tensors)}")
    x = as_float32(tensors[0]).reshape(b.shape if b.dim() else (1,))
    b1 = b.reshape(x.shape)
    scores = importance(x, b1)
    keep = scores >= threshold(scores)
    return ((x - b1) * keep).add_(b1).reshape(b.shape)


ARCEE_FUSION = MergeMethod(
    name="arcee_fusion",
    requires_base=True,
    tensor_params={},
    global_params={},
    random=False,
    elementwise=False,
    fn=_arcee_fusion,
    min_sources=1,
    max_sources=1,
    search_refusal="arcee_fusion has no parameter: its mask comes from the models themselves",
    summary="base + the other model's deltas where their importance passes median + 1.5 IQR",
    reference_url="https://arcee.ai",
    doc=__doc__ or "",
)
