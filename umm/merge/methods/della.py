"""``della`` and ``della_linear``: magnitude-ranked random drop (mergekit's DELLA).

Formula (mergekit's ``della_magprune``), per model; rows are dim 0 (a 1-D tensor is one row)::

    rank = ascending rank of |θᵢ − θ₀| along dim 1, 1..m
    p = (density − epsilon) + 2 · epsilon · (rank − 1) / (m − 1)     # larger deltas kept more often
    δᵢ = (θᵢ − θ₀) ⊙ Bernoulli(p)    (× sum|θᵢ − θ₀| / sum|δᵢ| if rescale)
    della:        TIES sign election on wᵢ δᵢ, divided by the kept weights if normalize
    della_linear: result = θ₀ + lambda · Σᵢ wᵢ δᵢ [/ Σᵢ wᵢ if normalize]

``density ± epsilon`` must lie in (0, 1) whenever density < 1. Defaults: ``epsilon`` 0.15,
``density`` 1.0, ``rescale`` true; ``normalize`` true for della, false for della_linear;
``lambda`` 1.0. Base model required. Random (see :mod:`umm.merge.methods.dare` on generators).
Not elementwise unless every density is 1.
"""

from __future__ import annotations

from functools import partial

from umm.merge.methods.base import MergeMethod
from umm.merge.methods.gta import density_is_one, gta_global_params, gta_merge

_PARAMS = {"weight": None, "density": 1.0, "epsilon": 0.15}

DELLA = MergeMethod(
    name="della",
    requires_base=True,
    tensor_params=_PARAMS,
    global_params=gta_global_params(normalize=True, rescale=True),
    random=True,
    elementwise=False,
    fn=partial(gta_merge, method="della", sparsification="della_magprune", consensus=True),
    elementwise_fn=density_is_one,
    summary="rank-based random drop of task vectors, TIES sign election",
    reference_url="https://arxiv.org/abs/2406.11617",
)

DELLA_LINEAR = MergeMethod(
    name="della_linear",
    requires_base=True,
    tensor_params=_PARAMS,
    global_params=gta_global_params(normalize=False, rescale=True),
    random=True,
    elementwise=False,
    fn=partial(gta_merge, method="della_linear", sparsification="della_magprune", consensus=False),
    elementwise_fn=density_is_one,
    summary="rank-based random drop of task vectors, weighted sum",
    reference_url="https://arxiv.org/abs/2406.11617",
)
