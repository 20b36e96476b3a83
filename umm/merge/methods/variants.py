"""The task-arithmetic family: one table of variants over the engine in :mod:`.gta`.

task_arithmetic, TIES, DARE, breadcrumbs and DELLA differ only in how each task vector is
sparsified, whether signs are elected (TIES-style consensus) and their defaults. Each
:class:`Variant` row says exactly that and keeps its formula docstring, as mergekit's method
registry does; :func:`method` turns a row into the :class:`~.base.MergeMethod` that
:mod:`.registry` lists, whose ``__doc__`` is that formula (``umm.merge.METHODS["ties"].__doc__``).
The formulas of every row follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from umm.merge.methods.base import MergeMethod
from umm.merge.methods.gta import density_is_one, gta_global_params, gta_merge, gta_prepare

#: Per-model parameters a sparsification adds to ``weight`` and ``density``, with defaults.
_EXTRA_PARAMS: dict[str | None, dict[str, float]] = {"magnitude_outliers": {"gamma": 0.01},
                                                     "della_magprune": {"epsilon": 0.15}}
#: Sparsifications that draw random numbers (whole tensors only, from a seeded generator).
_RANDOM = frozenset({"random", "della_magprune"})
#: Sparsifications whose whole-tensor cuts :func:`.gta.gta_prepare` finds, so rows merge in blocks.
_PREPARED = frozenset({"magnitude", "magnitude_outliers"})


@dataclass(frozen=True)
class Variant:
    """One member of the family: its sparsification of the task vectors (``None``: none;
    ``magnitude``, ``random``, ``magnitude_outliers`` or ``della_magprune``, see
    :mod:`.sparsify`), whether it elects signs, its ``normalize``/``rescale`` defaults, and
    its formula docstring."""

    name: str
    sparsify: str | None
    sign_consensus: bool
    normalize: bool
    rescale: bool
    summary: str
    reference_url: str
    doc: str


_TASK_ARITHMETIC = """\
``task_arithmetic``: base plus the weighted sum of task vectors (mergekit's ``task_arithmetic``).

Formula::

    result = θ₀ + lambda · (Σᵢ wᵢ (θᵢ − θ₀)) [/ Σᵢ wᵢ if normalize]

Defaults: ``normalize`` false, ``rescale`` false (no effect: nothing is sparsified),
``lambda`` 1.0, ``density`` 1.0 (accepted; below 1 it is ignored, as in mergekit, because this
method does not sparsify). Base model required. Elementwise. See :mod:`umm.merge.methods.gta`.
"""

_TIES = """\
``ties``: TIES-merging — trim, elect sign, disjoint merge (mergekit's ``ties``).

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
to the whole-tensor merge.
"""

_DARE = """\
``dare_linear`` and ``dare_ties``: random drop of task-vector entries (mergekit's DARE).

Formula::

    δᵢ = (θᵢ − θ₀) ⊙ Bernoulli(densityᵢ)         (each entry kept with probability density)
    if rescale (default true): δᵢ ×= sum|θᵢ − θ₀| / sum|δᵢ|   # mergekit's L1 rescale, not 1/density
    dare_linear: result = θ₀ + lambda · Σᵢ wᵢ δᵢ [/ Σᵢ wᵢ if normalize]
    dare_ties:   TIES sign election on vᵢ = wᵢ δᵢ, as in ``ties``

Defaults: ``normalize`` false, ``rescale`` true, ``lambda`` 1.0, ``density`` 1.0. Base model
required. Random: the mask is drawn from the ``generator`` passed to ``merge`` (use
:func:`~umm.merge.methods.base.tensor_generator` so a seed reproduces the merge exactly; the
draws are not mergekit's, which uses the global torch RNG). Not elementwise (the rescale uses
whole-tensor sums and the draws depend on the tensor), unless every density is 1.
"""

_BREADCRUMBS = """\
``breadcrumbs`` and ``breadcrumbs_ties``: drop the smallest *and* the largest deltas.

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

_DELLA = """\
``della`` and ``della_linear``: magnitude-ranked random drop (mergekit's DELLA).

Formula (mergekit's ``della_magprune``), per model; rows are dim 0 (a 1-D tensor is one row)::

    rank = ascending rank of |θᵢ − θ₀| along dim 1, 1..m
    p = (density − epsilon) + 2 · epsilon · (rank − 1) / (m − 1)     # larger deltas kept more often
    δᵢ = (θᵢ − θ₀) ⊙ Bernoulli(p)    (× sum|θᵢ − θ₀| / sum|δᵢ| if rescale)
    della:        TIES sign election on wᵢ δᵢ, divided by the kept weights if normalize
    della_linear: result = θ₀ + lambda · Σᵢ wᵢ δᵢ [/ Σᵢ wᵢ if normalize]

``density ± epsilon`` must lie in (0, 1) whenever density < 1. Defaults: ``epsilon`` 0.15,
``density`` 1.0, ``rescale`` true; ``normalize`` true for della, false for della_linear;
``lambda`` 1.0. Base model required. Random (see ``dare_linear`` on generators).
Not elementwise unless every density is 1.
"""

_DARE_URL = "https://arxiv.org/abs/2311.03099"
_BREADCRUMBS_URL = "https://arxiv.org/abs/2312.06795"
_DELLA_URL = "https://arxiv.org/abs/2406.11617"

#: The family, one row per method (name, sparsify, sign consensus, normalize, rescale, ...).
VARIANTS: tuple[Variant, ...] = (
    Variant("task_arithmetic", None, False, False, False,
            "base + lambda * weighted sum of task vectors", "https://arxiv.org/abs/2212.04089", _TASK_ARITHMETIC),
    Variant("ties", "magnitude", True, True, False,
            "magnitude trim + sign election + disjoint mean of task vectors", "https://arxiv.org/abs/2306.01708",
            _TIES),
    Variant("dare_linear", "random", False, False, True,
            "random drop + rescale of task vectors, weighted sum", _DARE_URL, _DARE),
    Variant("dare_ties", "random", True, False, True,
            "random drop + rescale of task vectors, TIES sign election", _DARE_URL, _DARE),
    Variant("breadcrumbs", "magnitude_outliers", False, False, False,
            "drop smallest and largest deltas, weighted sum", _BREADCRUMBS_URL, _BREADCRUMBS),
    Variant("breadcrumbs_ties", "magnitude_outliers", True, False, False,
            "drop smallest and largest deltas, TIES sign election", _BREADCRUMBS_URL, _BREADCRUMBS),
    Variant("della", "della_magprune", True, True, True,
            "rank-based random drop of task vectors, TIES sign election", _DELLA_URL, _DELLA),
    Variant("della_linear", "della_magprune", False, False, True,
            "rank-based random drop of task vectors, weighted sum", _DELLA_URL, _DELLA),
)


def method(v: Variant) -> MergeMethod:
    """The :class:`MergeMethod` of row ``v``: :func:`.gta.gta_merge` with its sparsification."""
    sparsified = v.sparsify is not None
    return MergeMethod(
        name=v.name,
        requires_base=True,
        tensor_params={"weight": None, "density": 1.0, **_EXTRA_PARAMS.get(v.sparsify, {})},
        global_params=gta_global_params(normalize=v.normalize, rescale=v.rescale),
        random=v.sparsify in _RANDOM,
        elementwise=not sparsified,
        fn=partial(gta_merge, method=v.name, sparsification=v.sparsify, consensus=v.sign_consensus),
        elementwise_fn=density_is_one if sparsified else None,
        prepare_fn=(partial(gta_prepare, method=v.name, sparsification=v.sparsify)
                    if v.sparsify in _PREPARED else None),
        summary=v.summary,
        reference_url=v.reference_url,
        doc=v.doc,
    )


#: The family's methods, in table order.
FAMILY: tuple[MergeMethod, ...] = tuple(method(v) for v in VARIANTS)

if __doc__ is not None:  # (python -OO strips docstrings)
    __doc__ += "\n" + "\n".join(dict.fromkeys(v.doc for v in VARIANTS))
