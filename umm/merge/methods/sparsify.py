"""Sparsification of task vectors (deltas), with mergekit's semantics; all work in place.

Every function takes a fresh float32 delta ``d`` that it may overwrite and returns it.

- ``magnitude`` (TIES): keep the ``k = max(1, int(density * n))`` entries of largest ``|d|``
  (``density <= 0``: all zero).
- ``magnitude_outliers`` (breadcrumbs): with ``target = int(density * n)``,
  ``n_top = int(gamma * n)`` and ``n_bot = max(0, n - target - n_top)``, keep the ``target``
  entries of ascending-``|d|`` rank ``n_bot .. n_bot + target - 1`` (drops the smallest and
  the ``gamma`` largest).
- ``bernoulli`` (DARE): keep each entry independently with probability ``density``.
- ``della_magprune`` (DELLA): along dim 1 (a 1-D tensor is one row), rank ``|d|`` ascending
  (rank 1..m), ``p = (density - epsilon) + 2 * epsilon * (rank - 1) / (m - 1)``, keep each
  entry with probability ``p``; ``density ± epsilon`` must lie in (0, 1).

Every method returns ``d`` unchanged when ``density >= 1`` (no rescale either). With
``rescale`` the kept entries are multiplied by ``sum|d| / sum|kept|`` (mergekit's L1 rescale;
not ``1/density``), unless either sum is below 1e-7.

These are the semantics of the released mergekit (0.1.5, ``mergekit/sparsify.py``); older
mergekit asserted on ``k == 0`` and, in ``magnitude_outliers``, kept nothing when
``n_top == 0`` (its ``indices[n_bot:-0]``). Ranks are exact and deterministic: among entries
of equal magnitude the lower flat index comes first, i.e. the result equals mergekit's sort made
*stable* (descending for ``magnitude``, ascending for ``magnitude_outliers``; mergekit's
unstable ``argsort`` leaves the choice among exact ties unspecified), but is found with one or
two radix selections (O(n), :func:`kth_smallest`) instead of a full sort. One edge case differs:
``della_magprune`` on rows of a single entry uses ``p = density`` (mergekit divides 0 by 0).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

RESCALE_EPS = 1e-7


RADIX_MIN = 1 << 16  # below this, torch.kthvalue is as fast


def kth_smallest(a: torch.Tensor, r: int) -> torch.Tensor:
    """The value at 0-based ascending rank ``r`` of 1-D ``a`` (non-negative, no NaN), exactly.

    Radix select on the float32 bit patterns (order-preserving for non-negative floats): a
    histogram of the top 16 bits finds the bucket holding rank ``r``, a histogram of the low 16
    bits inside that bucket finds the exact value. Two bincounts instead of a selection over the
    whole tensor: several times faster than ``torch.kthvalue`` on millions of entries.
    """
    if a.numel() < RADIX_MIN or a.dtype != torch.float32:
        return torch.kthvalue(a, r + 1).values
    bits = a.view(torch.int32)
    cum = torch.bincount(bits >> 16, minlength=1 << 15).cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([r], device=a.device, dtype=cum.dtype), right=True)[0])
    # bin 0: below the bucket, bins 1..65536: the bucket's low 16 bits, bin 65537: above it
    low = (bits - (b << 16)).clamp_(-1, 1 << 16).add_(1)
    cum = torch.bincount(low, minlength=(1 << 16) + 2).cumsum(0)
    j = int(torch.searchsorted(cum, torch.tensor([r], device=a.device, dtype=cum.dtype), right=True)[0])
    return torch.tensor([(b << 16) + j - 1], dtype=torch.int32, device=a.device).view(torch.float32)[0]


def _mask_from_threshold(a: torch.Tensor, v: torch.Tensor, n_above: int) -> torch.Tensor:
    """Entries ``> v`` plus the first (lowest-index) entries ``== v`` to make ``n_above`` in all."""
    mask = a > v
    need = n_above - int(torch.count_nonzero(mask))
    if need <= 0:
        return mask
    eq = a == v
    n_eq = int(torch.count_nonzero(eq))
    if need >= n_eq:
        return mask.logical_or_(eq)
    return mask.logical_or_(eq.logical_and_(eq.cumsum(0, dtype=torch.int32) <= need))


def rank_range_mask(a: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Bool mask of the entries of 1-D ``a`` whose stable ascending rank r has ``lo <= r < hi``.

    Among equal values the lower flat index has the lower rank.
    """
    n = a.numel()
    lo, hi = max(0, lo), min(n, hi)
    if lo >= hi:
        return torch.zeros(n, dtype=torch.bool, device=a.device)
    mask = torch.ones(n, dtype=torch.bool, device=a.device) if lo == 0 else _rank_at_least(a, lo)
    if hi < n:
        mask.logical_and_(_rank_at_least(a, hi).logical_not_())
    return mask


def _rank_at_least(a: torch.Tensor, r: int) -> torch.Tensor:
    """Bool mask of the entries of ``a`` whose stable ascending rank is >= r (0 < r < n)."""
    v = kth_smallest(a, r)  # value of the entry at rank r
    # entries below v have rank < r; ties at v are ranked by index: the *last* ones reach >= r
    below = a < v
    eq = a == v
    n_eq = int(torch.count_nonzero(eq))
    first_rank = int(torch.count_nonzero(below))  # rank of the first tie
    mask = below.logical_or_(eq).logical_not_()  # entries > v
    skip = r - first_rank  # ties ranked below r
    if skip <= 0:
        return mask.logical_or_(eq)
    if skip >= n_eq:
        return mask
    return mask.logical_or_(eq.logical_and_(eq.cumsum(0, dtype=torch.int32) > skip))


def top_k_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries of 1-D ``a``; equal values: lower index first.

    Equals the first ``k`` of a stable descending sort, found by one selection (O(n)).
    """
    n = a.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=a.device)
    return _mask_from_threshold(a, kth_smallest(a, n - k), k)


def _rescale_l1(d: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    after = d.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return d
    return d.mul_(before / after)


def keep_and_rescale(d: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """Zero the entries of ``d`` where ``keep`` is 0 (in place); with ``rescale``, scale the rest
    so that ``d``'s L1 norm is what it was (left alone when either norm is below RESCALE_EPS)."""
    before = d.abs().sum() if rescale else None
    d.mul_(keep.view(d.shape))
    return _rescale_l1(d, before) if before is not None else d


def magnitude(d: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``int(density * n)`` largest-magnitude entries of ``d`` (in place)."""
    if density >= 1:
        return d
    n = d.numel()
    if density <= 0 or n == 0:
        return d.zero_()
    k = max(1, int(density * n))
    keep = top_k_mask(d.abs().view(-1), k)
    return keep_and_rescale(d, keep, rescale)


def magnitude_outliers(d: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False) -> torch.Tensor:
    """Drop the smallest and the ``gamma`` largest magnitudes, keeping ``density`` (in place)."""
    if density >= 1:
        return d
    n = d.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    keep = rank_range_mask(d.abs().view(-1), n_bot, n_bot + target)
    return keep_and_rescale(d, keep, rescale)


def bernoulli(d: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    """Keep each entry with probability ``density`` (in place)."""
    if density >= 1:
        return d
    keep = torch.rand(d.shape, generator=generator, device=d.device, dtype=torch.float32) < density
    return keep_and_rescale(d, keep, rescale)


def della_magprune(
    d: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DELLA's rank-dependent drop: larger magnitudes (per row) are kept more often (in place)."""
    if density >= 1:
        return d
    if density <= 0:
        return d.zero_()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della: epsilon ({epsilon}) must keep density ± epsilon inside (0, 1) (density {density})"
        )
    rows = d.unsqueeze(0) if d.dim() < 2 else d
    m = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    rank_norm = torch.empty(rows.shape, dtype=torch.float32, device=d.device)
    steps = torch.arange(m, dtype=torch.float32, device=d.device)
    if m > 1:
        steps = steps / (m - 1)
    else:
        steps.fill_(0.5)
    view = [1] * rows.dim()
    view[1] = m
    rank_norm.scatter_(1, order, steps.view(view).expand_as(rows).contiguous())
    probs = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    keep = torch.rand(rows.shape, generator=generator, device=d.device, dtype=torch.float32) < probs
    return keep_and_rescale(d, keep, rescale)


# ---------------------------------------------------------------------------------------------
# Row-block sparsification: a whole-tensor plan, then an element-wise step per block of rows
# ---------------------------------------------------------------------------------------------
#
# A magnitude selection (``magnitude``, ``magnitude_outliers``) depends on the whole tensor only
# through one or two *cuts*: the value at a rank and which of the entries equal to it count as
# above it. :func:`plan_selection` finds them from blocks of ``|d|`` read in flat order (radix
# select by histograms accumulated over the blocks, so the whole delta is never held), and
# :meth:`Selection.keep_mask` applies them to any block: the same entries as the whole-tensor
# functions above, exactly.

BlockStream = Callable[[], Iterable[torch.Tensor]]
"""Each call yields the 1-D float32 blocks of ``|d|`` (non-negative, finite) in flat order."""


@dataclass(frozen=True)
class Cut:
    """Entries *at or above* the cut: ``|d| > value``, or ``|d| == value`` at a flat index in
    ``[tie_start, tie_end)`` (the ties that a stable sort ranks above the cut)."""

    value: float
    tie_start: int
    tie_end: int

    def above(self, a: torch.Tensor, flat_start: int) -> torch.Tensor:
        """Bool mask of 1-D block ``a`` (flat indices ``flat_start ..``) at or above the cut."""
        v = torch.tensor(self.value, dtype=torch.float32, device=a.device)
        mask = a > v
        lo = min(max(self.tie_start - flat_start, 0), a.numel())
        hi = min(max(self.tie_end - flat_start, 0), a.numel())
        if lo < hi:
            mask[lo:hi].logical_or_(a[lo:hi] == v)
        return mask


@dataclass(frozen=True)
class Selection:
    """Which entries of one model's delta a sparsification keeps, and its L1 rescale factor.

    ``keep`` is ``"all"``, ``"zero"`` (every entry set to +0, as ``magnitude`` with density 0)
    or ``"cut"``: an entry is kept when it is at or above ``lower`` (if set) and not at or above
    ``upper`` (if set); dropped entries are multiplied by 0 (so -0 stays -0, as the whole-tensor
    functions do). ``scale``: multiply the kept entries by it (the whole tensor's
    ``sum|d| / sum|kept|``), ``None`` for no rescale.
    """

    keep: str
    lower: Cut | None = None
    upper: Cut | None = None
    scale: float | None = None

    def keep_mask(self, a: torch.Tensor, flat_start: int) -> torch.Tensor | None:
        """Bool mask over 1-D ``|d|`` block ``a`` starting at flat index ``flat_start``;
        ``None`` when every entry is kept."""
        if self.keep == "all":
            return None
        if self.keep == "zero":
            return torch.zeros(a.shape, dtype=torch.bool, device=a.device)
        mask = self.lower.above(a, flat_start) if self.lower is not None else None
        if self.upper is not None:
            below = self.upper.above(a, flat_start).logical_not_()
            mask = below if mask is None else mask.logical_and_(below)
        return mask if mask is not None else torch.ones(a.shape, dtype=torch.bool, device=a.device)

    def apply(self, d: torch.Tensor, flat_start: int) -> torch.Tensor:
        """Sparsify (and rescale) a block ``d`` of the delta in place, as the whole-tensor
        function would have done to these entries."""
        if self.keep == "zero":
            return d.zero_()
        keep = self.keep_mask(d.abs().view(-1), flat_start)
        if keep is not None:
            d.mul_(keep.view(d.shape))
        if self.scale is not None:
            d.mul_(torch.tensor(self.scale, dtype=torch.float32, device=d.device))
        return d


KEEP_ALL = Selection("all")


class _Histogram:
    """Counts of small non-negative ints over many blocks; small blocks are pooled (up to
    ``FLUSH`` entries) so each ``bincount`` sees at least that many."""

    FLUSH = 1 << 20

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self.counts: torch.Tensor | None = None
        self.pool: list[torch.Tensor] = []
        self.pooled = 0

    def add(self, idx: torch.Tensor) -> None:
        self.pool.append(idx)
        self.pooled += idx.numel()
        if self.pooled >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        if not self.pool:
            return
        idx = self.pool[0] if len(self.pool) == 1 else torch.cat(self.pool)
        self.pool, self.pooled = [], 0
        h = torch.bincount(idx, minlength=self.bins)
        if self.counts is None:
            self.counts = h
        else:
            if h.numel() > self.counts.numel():  # only NaN/Inf patterns exceed ``bins``
                self.counts, h = h, self.counts
            self.counts[: h.numel()].add_(h)

    def result(self) -> torch.Tensor:
        self._flush()
        return self.counts if self.counts is not None else torch.zeros(self.bins, dtype=torch.int64)


def _values_at_ranks(blocks: BlockStream, ranks: Sequence[int]) -> list[tuple[torch.Tensor, int, int]]:
    """(value, number below it, number equal to it) at each ascending rank of ``ranks``.

    Two passes over the blocks for all ranks together: a histogram of the top 16 bits of the
    float32 patterns, then of the low 16 bits of the entries inside each bucket holding one of
    the ranks (as :func:`kth_smallest`).
    """
    high = _Histogram(1 << 15)
    for a in blocks():
        high.add((a.view(torch.int32) >> 16).view(-1))
    cum = high.result().cumsum(0)
    at = torch.searchsorted(cum, torch.tensor(list(ranks), dtype=cum.dtype, device=cum.device), right=True)
    buckets = [int(b) for b in at]
    lows = {b: _Histogram(1 << 16) for b in buckets}
    for a in blocks():
        bits = a.view(torch.int32).view(-1)
        high_bits = bits >> 16
        for b, h in lows.items():
            h.add(bits[high_bits == b] & 0xFFFF)
    out = []
    for r, b in zip(ranks, buckets):
        below = int(cum[b - 1]) if b > 0 else 0  # entries in lower buckets
        counts = lows[b].result()
        low_cum = counts.cumsum(0)
        q = torch.tensor([r - below], dtype=low_cum.dtype, device=low_cum.device)
        j = int(torch.searchsorted(low_cum, q, right=True)[0])
        value = torch.tensor([(b << 16) + j], dtype=torch.int32).view(torch.float32)[0]
        out.append((value, below + (int(low_cum[j - 1]) if j > 0 else 0), int(counts[j])))
    return out


def _nth_equal_indices(blocks: BlockStream, queries: Sequence[tuple[torch.Tensor, int]], n: int) -> list[int]:
    """For each ``(value, m)``: the flat index of the ``m``-th (1-based) entry equal to ``value``
    (``n`` if there are fewer). One pass, stopping once every index is found."""
    seen = [0] * len(queries)
    found: list[int | None] = [None] * len(queries)
    start = 0
    for a in blocks():
        a = a.view(-1)
        for q, (value, m) in enumerate(queries):
            if found[q] is not None:
                continue
            eq = a == value.to(a.device)
            c = int(torch.count_nonzero(eq))
            if seen[q] + c >= m:
                found[q] = start + int(torch.nonzero(eq).view(-1)[m - seen[q] - 1])
            seen[q] += c
        if all(f is not None for f in found):
            break
        start += a.numel()
    return [n if f is None else f for f in found]


def _cuts(blocks: BlockStream, n: int, top_k: int | None, ranks: Sequence[int]) -> list[Cut]:
    """Cuts over a delta of ``n`` entries, found together (two or three passes in all).

    ``top_k`` (0 < k < n): the cut above which lie exactly the ``k`` largest entries, equal
    values: lower flat index first (as :func:`top_k_mask`). Each of ``ranks`` (0 < r < n): the
    cut above which lie exactly the entries of stable ascending rank ``>= r``, equal values:
    lower flat index ranks lower (as :func:`rank_range_mask`).
    """
    want = ([n - top_k] if top_k is not None else []) + list(ranks)
    found = _values_at_ranks(blocks, want)
    plans: list[tuple[float, int | None, bool]] = []  # value, m-th tie to find (or None), is top
    queries: list[tuple[torch.Tensor, int]] = []
    for q, (r, (value, n_below, n_eq)) in enumerate(zip(want, found)):
        if q == 0 and top_k is not None:
            m = top_k - (n - n_below - n_eq)  # ties to keep: the first ``m`` by flat index
            tie = None if m >= n_eq else m
        else:
            m = r - n_below  # ties ranked below r: the first ``m`` by flat index
            tie = None if m <= 0 else m
        plans.append((float(value), len(queries) if tie is not None else None, q == 0 and top_k is not None))
        if tie is not None:
            queries.append((value, tie))
    index = _nth_equal_indices(blocks, queries, n) if queries else []
    cuts = []
    for value, qi, top in plans:
        if top:
            cuts.append(Cut(value, 0, n if qi is None else index[qi] + 1))
        else:
            cuts.append(Cut(value, 0 if qi is None else index[qi] + 1, n))
    return cuts


def plan_selection(
    kind: str,
    blocks: BlockStream,
    n: int,
    density: float,
    gamma: float = 0.0,
    whole_delta: Callable[[], torch.Tensor] | None = None,
) -> Selection:
    """The :class:`Selection` of ``magnitude`` (``kind="magnitude"``) or ``magnitude_outliers``
    over a delta of ``n`` entries whose ``|d|`` the ``blocks`` stream yields.

    ``whole_delta`` (for ``rescale`` only) returns the whole fresh float32 delta, whose
    whole-tensor sums give the rescale factor exactly as the whole-tensor functions compute it.
    """
    if density >= 1:
        return KEEP_ALL
    if kind == "magnitude":
        if density <= 0 or n == 0:
            return Selection("zero")
        k = max(1, int(density * n))
        sel = KEEP_ALL if k >= n else Selection("cut", lower=_cuts(blocks, n, k, [])[0])
    elif kind == "magnitude_outliers":
        target = int(density * n)
        n_bot = max(0, n - target - int(gamma * n))
        lo, hi = n_bot, min(n, n_bot + target)
        if lo >= hi:  # nothing kept
            sel = Selection("cut", lower=Cut(float("inf"), 0, 0))
        else:
            ranks = [r for r in (lo, hi) if 0 < r < n]
            cuts = dict(zip(ranks, _cuts(blocks, n, None, ranks))) if ranks else {}
            lower, upper = cuts.get(lo), cuts.get(hi)
            sel = Selection("cut", lower=lower, upper=upper) if lower or upper else KEEP_ALL
    else:
        raise ValueError(f"no row-block plan for sparsification {kind!r}")
    if whole_delta is None:
        return sel
    d = whole_delta()
    before = d.abs().sum()
    sel.apply(d, 0)
    after = d.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return sel
    return Selection(sel.keep, sel.lower, sel.upper, float(before / after))
