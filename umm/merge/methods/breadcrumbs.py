"""``breadcrumbs`` and ``breadcrumbs_ties``: drop the smallest *and* the largest deltas.

Formula (mergekit's ``magnitude_outliers`` sparsification), per model over the whole tensor of
n entries::

    target = int(density · n) ; n_top = int(gamma · n) ; n_bot = max(0, n − target − n_top)
    δᵢ = θᵢ − θ₀ keeping only the entries of ascending-|δ| rank n_bot .. n_bot + target − 1
    (× sum|δ|/sum|kept| if rescale)
    breadcrumbs:      result = θ₀ + lambda · Σᵢ wᵢ δᵢ [/ Σᵢ wᵢ if normalize]
    breadcrumbs_ties: TIES sign election on wᵢ δᵢ

Defaults: ``gamma`` 0.01, ``density`` 1.0, ``normalize`` false, ``rescale`` false,
``lambda`` 1.0. Base model required. As in the released mergekit (0.1.5), ``n_top == 0``
(gamma 0, or tensors under 1/gamma entries) keeps the top entries. Not elementwise unless every
density is 1; mergeable in row blocks after ``prepare`` (both cuts, as for ``ties``).
"""

from __future__ import annotations

from functools import partial

from umm.merge.methods.base import MergeMethod
from umm.merge.methods.gta import density_is_one, gta_global_params, gta_merge, gta_prepare

_PARAMS = {"weight": None, "density": 1.0, "gamma": 0.01}

BREADCRUMBS = MergeMethod(
    name="breadcrumbs",
    requires_base=True,
    tensor_params=_PARAMS,
    global_params=gta_global_params(normalize=False, rescale=False),
    random=False,
    elementwise=False,
    fn=partial(gta_merge, method="breadcrumbs", sparsification="magnitude_outliers", consensus=False),
    elementwise_fn=density_is_one,
    prepare_fn=partial(gta_prepare, method="breadcrumbs", sparsification="magnitude_outliers"),
    summary="drop smallest and largest deltas, weighted sum",
    reference_url="https://arxiv.org/abs/2312.06795",
)

BREADCRUMBS_TIES = MergeMethod(
    name="breadcrumbs_ties",
    requires_base=True,
    tensor_params=_PARAMS,
    global_params=gta_global_params(normalize=False, rescale=False),
    random=False,
    elementwise=False,
    fn=partial(gta_merge, method="breadcrumbs_ties", sparsification="magnitude_outliers", consensus=True),
    elementwise_fn=density_is_one,
    prepare_fn=partial(gta_prepare, method="breadcrumbs_ties", sparsification="magnitude_outliers"),
    summary="drop smallest and largest deltas, TIES sign election",
    reference_url="https://arxiv.org/abs/2312.06795",
)
