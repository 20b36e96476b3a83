"""Bounded genome values <-> the unbounded vectors the optimizer searches.

Each gene ``x`` lives in ``[low, high]``; the optimizer sees ``z = logit((x - low) / (high - low))``
and every ``z`` in R maps back inside the bounds with ``x = low + (high - low) * sigmoid(z)``.

Why our own logistic map rather than ``cma``'s ``bounds`` option (``BoundTransform``, identity
inside the box, quadratic near its edges): the vectors CMA-ES asks and is told are then exactly
the plain vectors we store and replay on resume (no repair step inside the strategy), every
parameter (weights, densities, ``t``) gets the same scale whatever its interval, and the random
baseline can sample the same box. ``sigma0`` is in logit units: near the centre 0.7 is about
1/6 of the interval, the step size mergekit-evolve and Sakana use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: starting values on (or beyond) a bound are pulled this fraction inside it, so z stays finite
EDGE = 0.02


@dataclass(frozen=True)
class BoxTransform:
    """Per-gene bounds ``low[i] <= x[i] <= high[i]`` (1-D arrays of one length)."""

    low: np.ndarray
    high: np.ndarray

    def __post_init__(self) -> None:
        if self.low.shape != self.high.shape or self.low.ndim != 1:
            raise ValueError("low and high must be 1-D arrays of the same length")
        if not np.all(self.high > self.low):
            raise ValueError("every bound needs low < high")

    @property
    def dimension(self) -> int:
        return int(self.low.shape[0])

    def to_bounded(self, z: np.ndarray) -> np.ndarray:
        """Map an unbounded vector to genome values strictly inside the bounds."""
        z = np.clip(np.asarray(z, dtype=np.float64), -700.0, 700.0)  # exp stays finite
        return self.low + (self.high - self.low) / (1.0 + np.exp(-z))

    def to_unbounded(self, x: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_bounded`; values on or outside a bound are clipped just inside."""
        x = np.asarray(x, dtype=np.float64)
        u = np.clip((x - self.low) / (self.high - self.low), EDGE, 1.0 - EDGE)
        return np.log(u) - np.log1p(-u)

    def sample_uniform(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` genome vectors drawn uniformly in the box (the random-search baseline)."""
        return rng.uniform(self.low, self.high, size=(n, self.dimension))
