"""``task_arithmetic``: base plus the weighted sum of task vectors (mergekit's ``task_arithmetic``).

Formula::

    result = θ₀ + lambda · (Σᵢ wᵢ (θᵢ − θ₀)) [/ Σᵢ wᵢ if normalize]

Defaults: ``normalize`` false, ``rescale`` false (no effect: nothing is sparsified),
``lambda`` 1.0, ``density`` 1.0 (accepted; below 1 it is ignored, as in mergekit, because this
method does not sparsify). Base model required. Elementwise. See :mod:`umm.merge.methods.gta`.
"""

from __future__ import annotations

from functools import partial

from umm.merge.methods.base import MergeMethod
from umm.merge.methods.gta import gta_global_params, gta_merge

TASK_ARITHMETIC = MergeMethod(
    name="task_arithmetic",
    requires_base=True,
    tensor_params={"weight": None, "density": 1.0},
    global_params=gta_global_params(normalize=False, rescale=False),
    random=False,
    elementwise=True,
    fn=partial(gta_merge, method="task_arithmetic", sparsification=None, consensus=False),
    summary="base + lambda * weighted sum of task vectors",
    reference_url="https://arxiv.org/abs/2212.04089",
)
