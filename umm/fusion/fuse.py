"""Fusion of several teachers' sparse distributions (already on pivot ids) into one target.

Per sequence, as FuseLLM defines them: each model's cross-entropy on the gold response gives a
reward ``exp(-CE)``; **MinCE** takes the distribution of the model with the lowest CE (the first
one on ties, so list the pivot first), **AvgCE** mixes all distributions with weights
``softmax(exp(-CE))`` over the models. A model whose CE is NaN (no output for this sequence)
gets weight 0. The result is a :class:`~umm.fusion.sparse.SparseDist` whose width is the sum of
the inputs' widths (entries sharing an id are merged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from umm.errors import UmmError
from umm.fusion.sparse import SparseDist, merge_duplicates

METHODS = ("minCE", "avgCE")


class FusionFunction:
    """``FusionFunction("minCE")`` or ``FusionFunction("avgCE")``; call it on (dists, ces)."""

    def __init__(self, method: str = "minCE") -> None:
        canon = {m.lower(): m for m in METHODS}
        if method.lower() not in canon:
            raise UmmError(f"unknown fusion function {method!r}; use one of {', '.join(METHODS)}")
        self.method = canon[method.lower()]

    def __repr__(self) -> str:
        return f"FusionFunction({self.method!r})"

    def weights(self, ces: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """The weight of each model for one sequence (sums to 1)."""
        ce = torch.as_tensor(ces, dtype=torch.float64).flatten()
        valid = ~torch.isnan(ce)
        if not bool(valid.any()):
            raise UmmError("no model has a cross-entropy for this sequence; nothing to fuse")
        if self.method == "minCE":
            masked = torch.where(valid, ce, torch.full_like(ce, math.inf))
            w = torch.zeros_like(ce)
            w[int(torch.argmin(masked))] = 1.0  # argmin returns the first minimum
            return w
        reward = torch.where(valid, torch.exp(-ce), torch.full_like(ce, -math.inf))
        return torch.softmax(reward, dim=0)

    def __call__(self, dists: Sequence[SparseDist], ces: Sequence[float] | torch.Tensor) -> SparseDist:
        if not dists:
            raise UmmError("no distributions to fuse")
        lengths = {d.length for d in dists}
        if len(lengths) != 1:
            raise UmmError(f"distributions to fuse cover different lengths {sorted(lengths)}")
        w = self.weights(ces)
        if w.numel() != len(dists):
            raise UmmError(f"{len(dists)} distributions but {w.numel()} cross-entropies")
        keep = [i for i in range(len(dists)) if float(w[i]) > 0]
        ids = torch.cat([dists[i].ids for i in keep], dim=1)
        probs = torch.cat([dists[i].probs() * float(w[i]) for i in keep], dim=1)
        mask = torch.cat([dists[i].mask for i in keep], dim=1)
        return merge_duplicates(ids, probs, mask)


def fuse(dists: Sequence[SparseDist], ces: Sequence[float] | torch.Tensor, method: str = "minCE") -> SparseDist:
    """Shorthand for ``FusionFunction(method)(dists, ces)``."""
    return FusionFunction(method)(dists, ces)
