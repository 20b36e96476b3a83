"""``ties``: TIES-merging — trim, elect sign, disjoint merge (mergekit's ``ties``).

Formula::

    δᵢ = keep the int(densityᵢ · n) largest |θᵢ − θ₀| of the tensor, zero the rest
         (then × sum|δ|/sum|kept| if rescale)
    vᵢ = wᵢ δᵢ ;  s = sign(Σᵢ vᵢ) (0 → +) ;  mᵢ = [sign(vᵢ) = s]
    result = θ₀ + lambda · (Σᵢ mᵢ vᵢ) / (Σᵢ mᵢ wᵢ, 0 → 1)     (division only if normalize)

Defaults: ``normalize`` true, ``rescale`` false, ``lambda`` 1.0, ``density`` 1.0,
``int8_mask`` false (no effect on the result). Base model required. The top-k threshold is
found by selection (``kthvalue``), not a full sort; ties in magnitude are broken by flat index,
which equals a stable sort. Not elementwise unless every density is 1, but mergeable in row
blocks: ``prepare`` finds each model's threshold and how many ties at it to keep (reading rows of
one model at a time) and ``merge(..., state=, row_offset=)`` applies it per block, bit-identical
to the whole-tensor merge. Also ``breadcrumbs_ties`` lives in :mod:`umm.merge.methods.breadcrumbs`.
"""

from __future__ import annotations

from functools import partial

from umm.merge.methods.base import MergeMethod
from umm.merge.methods.gta import density_is_one, gta_global_params, gta_merge, gta_prepare

TIES = MergeMethod(
    name="ties",
    requires_base=True,
    tensor_params={"weight": None, "density": 1.0},
    global_params=gta_global_params(normalize=True, rescale=False),
    random=False,
    elementwise=False,
    fn=partial(gta_merge, method="ties", sparsification="magnitude", consensus=True),
    elementwise_fn=density_is_one,
    prepare_fn=partial(gta_prepare, method="ties", sparsification="magnitude"),
    summary="magnitude trim + sign election + disjoint mean of task vectors",
    reference_url="https://arxiv.org/abs/2306.01708",
)
