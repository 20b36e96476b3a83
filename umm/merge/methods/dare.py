"""``dare_linear`` and ``dare_ties``: random drop of task-vector entries (mergekit's DARE).

Formula::

    δᵢ = (θᵢ − θ₀) ⊙ Bernoulli(densityᵢ)         (each entry kept with probability density)
    if rescale (default true): δᵢ ×= sum|θᵢ − θ₀| / sum|δᵢ|   # mergekit's L1 rescale, not 1/density
    dare_linear: result = θ₀ + lambda · Σᵢ wᵢ δᵢ [/ Σᵢ wᵢ if normalize]
    dare_ties:   TIES sign election on vᵢ = wᵢ δᵢ, as in :mod:`umm.merge.methods.ties`

Defaults: ``normalize`` false, ``rescale`` true, ``lambda`` 1.0, ``density`` 1.0. Base model
required. Random: the mask is drawn from the ``generator`` passed to ``merge`` (use
:func:`~umm.merge.methods.base.tensor_generator` so a seed reproduces the merge exactly; the
draws are not mergekit's, which uses the global torch RNG). Not elementwise (the rescale uses
whole-tensor sums and the draws depend on the tensor), unless every density is 1.
"""

from __future__ import annotations

from functools import partial

from umm.merge.methods.base import MergeMethod
from umm.merge.methods.gta import density_is_one, gta_global_params, gta_merge

DARE_LINEAR = MergeMethod(
    name="dare_linear",
    requires_base=True,
    tensor_params={"weight": None, "density": 1.0},
    global_params=gta_global_params(normalize=False, rescale=True),
    random=True,
    elementwise=False,
    fn=partial(gta_merge, method="dare_linear", sparsification="random", consensus=False),
    elementwise_fn=density_is_one,
    summary="random drop + rescale of task vectors, weighted sum",
    reference_url="https://arxiv.org/abs/2311.03099",
)

DARE_TIES = MergeMethod(
    name="dare_ties",
    requires_base=True,
    tensor_params={"weight": None, "density": 1.0},
    global_params=gta_global_params(normalize=False, rescale=True),
    random=True,
    elementwise=False,
    fn=partial(gta_merge, method="dare_ties", sparsification="random", consensus=True),
    elementwise_fn=density_is_one,
    summary="random drop + rescale of task vectors, TIES sign election",
    reference_url="https://arxiv.org/abs/2311.03099",
)
