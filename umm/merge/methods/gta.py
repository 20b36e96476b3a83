"""Generalised task arithmetic: the engine behind the family in :mod:`.variants` (TIES, DARE, ...).

Formula (mergekit's ``GeneralizedTaskArithmeticMerge``), for base θ₀ and models θ₁..θₙ with
per-model ``weight`` wᵢ and ``density``::

    δᵢ = sparsify(θᵢ − θ₀)                   # per method: none / magnitude / random / ...
    vᵢ = wᵢ · δᵢ
    consensus (TIES-style methods):
        s = sign(Σᵢ vᵢ) with 0 counted as +   # "sum" sign election
        mᵢ = [sign(vᵢ) == s]                  # zero entries never count
        Δ = Σᵢ mᵢ vᵢ ;  D = Σᵢ mᵢ wᵢ ;  D[D == 0] = 1
    otherwise:
        Δ = Σᵢ vᵢ ;  D = Σᵢ wᵢ ;  D = 1 if |D| < 1e-8
    if normalize: Δ = Δ / D
    if lambda != 1: Δ = lambda · Δ
    result = θ₀ + Δ

Global parameters: ``normalize`` (method default), ``rescale`` (method default; L1 rescale of
sparsified deltas), ``lambda`` (1.0), ``int8_mask`` (False; only picks the dtype of mergekit's
mask tensor, so it does not change the result and is accepted for compatibility). Per-model:
``weight`` (required), ``density`` (1.0), plus ``gamma`` (0.01, breadcrumbs) or ``epsilon``
(0.15, DELLA). With no model besides the base the result is the base.

Precision: everything is computed in float32 (inputs of any float dtype are upcast), and the
result is float32. mergekit computes in the recipe's ``dtype`` (or the loaded dtype), so with
``dtype: bfloat16`` it rounds every intermediate to bf16; results agree to bf16 rounding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial

import torch

from umm.merge.methods import sparsify
from umm.merge.methods.base import MergeParameterError, RowReader, as_float32


def gta_global_params(normalize: bool, rescale: bool) -> dict[str, float | bool]:
    """Global parameters and defaults of a generalised task-arithmetic method."""
    return {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}


def gta_merge(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    generator: torch.Generator | None,
    *,
    method: str,
    sparsification: str | None,
    consensus: bool,
    state: Sequence[sparsify.Selection] | None = None,
    row_offset: int = 0,
) -> torch.Tensor:
    """Generalised task arithmetic over float32 deltas; see the module docstring.

    With ``state`` (one :class:`~.sparsify.Selection` per model, from :func:`gta_prepare`) the
    inputs are rows ``row_offset ..`` of the tensor and each delta is sparsified by its
    selection instead of over the block (everything else is element-wise).
    """
    if base is None:
        raise MergeParameterError(f"{method} needs a base model (set base_model in the recipe)")
    base32 = as_float32(base)
    if not tensors:
        return base32.clone() if base32 is base else base32
    rescale = bool(global_params["rescale"])
    weights = [float(p["weight"]) for p in tensor_params]

    deltas: list[torch.Tensor] = []
    for x, p, w in zip(tensors, tensor_params, weights):
        d = torch.sub(x, base32)  # a fresh tensor, float32 for any lower-precision float input
        if d.dtype != torch.float32:
            d = d.float()
        density = float(p["density"])
        try:
            if state is not None:
                d = state[len(deltas)].apply(d, row_offset * _row_numel(base32))
            elif sparsification == "magnitude":
                d = sparsify.magnitude(d, density, rescale)
            elif sparsification == "magnitude_outliers":
                d = sparsify.magnitude_outliers(d, density, float(p["gamma"]), rescale)
            elif sparsification == "random":
                d = sparsify.bernoulli(d, density, rescale, generator)
            elif sparsification == "della_magprune":
                d = sparsify.della_magprune(d, density, float(p["epsilon"]), rescale, generator)
        except ValueError as exc:
            raise MergeParameterError(str(exc)) from exc
        deltas.append(d.mul_(w) if w != 1.0 else d)

    normalize = bool(global_params["normalize"])
    if consensus:
        total = deltas[0].clone()
        for v in deltas[1:]:
            total.add_(v)
        # elected sign s = +1 where the weighted sum is >= 0, else -1 (a -0.0 sum only arises
        # when every vᵢ is zero there, so copysign's -1 for it changes nothing)
        sign = torch.ones_like(total).copysign_(total)
        mixed = total.zero_()
        divisor = torch.zeros_like(mixed) if normalize else None
        for v, w in zip(deltas, weights):
            v.mul_(sign).clamp_(min=0)  # |vᵢ| where sign(vᵢ) == s, else 0 (exact: s = ±1)
            mixed.add_(v)
            if divisor is not None:
                divisor.add_(v > 0, alpha=w)
        mixed.mul_(sign)
        del sign
        if divisor is not None:
            divisor.masked_fill_(divisor == 0, 1)  # in place; boolean-index assignment was 2x slower
            mixed.div_(divisor)
    else:
        mixed = deltas[0]
        for v in deltas[1:]:
            mixed.add_(v)
        if normalize:
            total = torch.tensor(weights, dtype=torch.float32).sum()
            if total.abs() < 1e-8:
                total = torch.ones((), dtype=torch.float32)
            mixed.div_(total.to(mixed.device))
    lam = float(global_params["lambda"])
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed.add_(base32)


def density_is_one(tensor_params: Sequence[Mapping[str, float]], _global: Mapping[str, float | bool]) -> bool:
    """True when no model is sparsified, which makes a GTA merge elementwise."""
    return all(float(p["density"]) >= 1 for p in tensor_params)


def _row_numel(x: torch.Tensor) -> int:
    return x.numel() // x.shape[0] if x.dim() and x.shape[0] else 1


def gta_prepare(
    base: RowReader | None,
    tensors: Sequence[RowReader],
    shape: tuple[int, ...],
    tensor_params: Sequence[Mapping[str, float]],
    global_params: Mapping[str, float | bool],
    block_rows: int,
    *,
    method: str,
    sparsification: str,
) -> tuple[sparsify.Selection, ...]:
    """Each model's :class:`~.sparsify.Selection` over the whole tensor, for merging row blocks.

    Reads ``block_rows`` rows of the base and of one model at a time (two or three passes per
    model); with ``rescale`` also that model's whole delta once (for the exact L1 sums).
    """
    if base is None:
        raise MergeParameterError(f"{method} needs a base model (set base_model in the recipe)")
    rows = shape[0]
    n = 1
    for s in shape:
        n *= s
    rescale = bool(global_params["rescale"])

    def delta(x: RowReader, start: int, end: int) -> torch.Tensor:
        d = torch.sub(x(start, end), as_float32(base(start, end)))
        return d if d.dtype == torch.float32 else d.float()

    out: list[sparsify.Selection] = []
    for x, p in zip(tensors, tensor_params):

        def blocks(x: RowReader = x) -> Iterator[torch.Tensor]:
            for s in range(0, rows, block_rows):
                yield delta(x, s, min(rows, s + block_rows)).abs_().view(-1)

        whole = partial(delta, x, 0, rows) if rescale else None
        out.append(sparsify.plan_selection(
            sparsification, blocks, n, float(p["density"]), float(p.get("gamma", 0.0)), whole_delta=whole
        ))
    return tuple(out)
