"""The search loop: CMA-ES (``cma``) or random search over an unbounded genome vector.

Both optimizers share one budget accounting: generation 0 evaluates the starting point (one
candidate), then every generation evaluates ``population`` candidates, for
``(evaluations - 1) // population`` generations or until the wall-time budget is spent (checked
before a generation starts; a started generation is finished). Fitness is maximised; in
``umm evolve`` it is the weighted mean of the task scores on the ``search`` items
(:func:`umm.evolve.report.objective`), whatever the optimizer.

After each generation the state (:mod:`umm.evolve.state`) is saved; :func:`run_search` given a
state with finished generations replays them into a fresh optimizer (see :func:`replay`) and
goes on, so a killed and resumed search ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from umm.errors import UmmError
from umm.evolve.state import Candidate, Generation, ResumeError, SearchState
from umm.evolve.transform import BoxTransform

logger = logging.getLogger(__name__)

#: what CMA-ES is told for a candidate whose evaluation failed (NaN fitness)
FAILED_FITNESS = -1e6


class BudgetError(UmmError):
    """The budget does not allow a single generation."""


@dataclass(frozen=True)
class Scored:
    """What the evaluation of one candidate returns."""

    scores: dict[str, float]
    fitness: float
    seconds: float
    apply_seconds: float = 0.0


#: evaluate the genome vectors (bounded values) of one generation, in order
EvaluateFn = Callable[[Sequence[np.ndarray], int], list[Scored]]


class Optimizer(Protocol):
    def ask(self) -> np.ndarray:
        """The next generation as a ``(population, dimension)`` array of unbounded vectors."""

    def tell(self, z: np.ndarray, fitness: Sequence[float]) -> None:
        """Report the fitness (higher is better) of the vectors of the last :meth:`ask`."""


class CmaOptimizer:
    """``cma.CMAEvolutionStrategy`` with its own random stream.

    Its samples come from a ``numpy.random.Generator`` seeded with ``seed`` (the ``randn`` option),
    and any use of numpy's global random state inside ``cma`` runs on a private copy of it, so
    nothing else in the process (evaluation, other libraries) can change what it asks, and a fresh
    instance fed the same history is in the same state.
    """

    def __init__(self, z0: np.ndarray, sigma0: float, population: int, seed: int) -> None:
        import cma

        self._rng = np.random.default_rng(seed)
        self._np_state = np.random.RandomState(seed).get_state()
        opts = {
            "popsize": population,
            "seed": np.nan,
            "randn": lambda lam, n: self._rng.standard_normal((lam, n)),
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolfun": 0,
            "tolx": 0,
            "tolflatfitness": np.inf,
        }
        with self._own_numpy_state():
            self.es = cma.CMAEvolutionStrategy(np.asarray(z0, dtype=np.float64), sigma0, opts)

    @contextmanager
    def _own_numpy_state(self) -> Iterator[None]:
        saved = np.random.get_state()
        np.random.set_state(self._np_state)
        try:
            yield
        finally:
            self._np_state = np.random.get_state()
            np.random.set_state(saved)

    def ask(self) -> np.ndarray:
        with self._own_numpy_state():
            return np.array(self.es.ask(), dtype=np.float64)

    def tell(self, z: np.ndarray, fitness: Sequence[float]) -> None:
        told = [-(f if math.isfinite(f) else FAILED_FITNESS) for f in fitness]  # cma minimises
        with self._own_numpy_state():
            self.es.tell([np.asarray(v) for v in z], told)


class RandomOptimizer:
    """Uniform random search in the bounded box (the baseline CMA-ES is compared with).

    It draws ``u ~ U(0, 1)`` per gene and returns ``logit(u)``, which the transform maps to a
    uniform value in ``[low, high]``.
    """

    def __init__(self, dimension: int, population: int, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self.dimension = dimension
        self.population = population

    def ask(self) -> np.ndarray:
        u = np.clip(self._rng.uniform(size=(self.population, self.dimension)), 1e-12, 1 - 1e-12)
        return np.log(u) - np.log1p(-u)

    def tell(self, z: np.ndarray, fitness: Sequence[float]) -> None:
        return None


def make_optimizer(state: SearchState) -> Optimizer:
    """A fresh optimizer for the settings of ``state`` (no generation replayed)."""
    if state.optimizer == "cma":
        return CmaOptimizer(np.asarray(state.z0), state.sigma0, state.population, state.seed)
    if state.optimizer == "random":
        return RandomOptimizer(state.dimension, state.population, state.seed)
    raise ValueError(f"unknown optimizer {state.optimizer!r} (valid: cma, random)")


def generations_for(evaluations: int, population: int) -> int:
    """Generations after the start point that fit in ``evaluations``; :class:`BudgetError` if none."""
    gens = (evaluations - 1) // population
    if gens < 1:
        raise BudgetError(
            f"a budget of {evaluations} evaluations does not fit one generation: it needs at least "
            f"{population + 1} (the starting point + a population of {population}); raise "
            "budget.evaluations or lower population"
        )
    return gens


def replay(optimizer: Optimizer, state: SearchState) -> None:
    """Feed the finished generations of ``state`` into a fresh ``optimizer``.

    Every replayed ``ask`` must return the stored vectors (relative tolerance 1e-9); otherwise
    the state was written by another version or setting and :class:`ResumeError` is raised.
    """
    for gen in state.generations[1:]:
        z = optimizer.ask()
        stored = np.array([c.z for c in gen.candidates], dtype=np.float64)
        if z.shape != stored.shape or not np.allclose(z, stored, rtol=1e-9, atol=1e-12):
            raise ResumeError(
                f"replaying generation {gen.index} does not reproduce the saved candidates: the run "
                "folder was written by another version or settings; start a new run folder"
            )
        optimizer.tell(z, [c.fitness for c in gen.candidates])


def _generation(
    index: int, z: np.ndarray, transform: BoxTransform, evaluate: EvaluateFn
) -> Generation:
    t0 = time.perf_counter()
    xs = transform.to_bounded(z)
    results = evaluate(list(xs), index)
    if len(results) != len(xs):
        raise RuntimeError(f"evaluate returned {len(results)} results for {len(xs)} candidates")
    cands = [
        Candidate(
            generation=index,
            index=i,
            z=[float(v) for v in zi],
            x=[float(v) for v in xi],
            scores=dict(r.scores),
            fitness=float(r.fitness),
            seconds=float(r.seconds),
            apply_seconds=float(r.apply_seconds),
        )
        for i, (zi, xi, r) in enumerate(zip(z, xs, results))
    ]
    return Generation(index=index, candidates=cands, seconds=time.perf_counter() - t0)


def run_search(
    state: SearchState,
    transform: BoxTransform,
    evaluate: EvaluateFn,
    *,
    generations: int,
    max_seconds: float | None = None,
    save: Callable[[SearchState], None] | None = None,
    on_generation: Callable[[SearchState, Generation], None] | None = None,
) -> SearchState:
    """Run (or continue) a search until ``generations`` generations after the start point are
    done or ``max_seconds`` of wall time (summed over resumes) are spent. ``save`` is called after
    every finished generation, before ``on_generation``. Returns ``state``, updated in place."""
    if transform.dimension != state.dimension:
        raise ValueError(f"transform has {transform.dimension} genes, state {state.dimension}")
    optimizer = make_optimizer(state)
    if state.generations:
        replay(optimizer, state)
        logger.info("resumed after generation %d (%d evaluations)", state.generations[-1].index, state.evaluations)
    else:
        gen0 = _generation(0, np.asarray([state.z0]), transform, evaluate)
        state.generations.append(gen0)
        if save:
            save(state)
        if on_generation:
            on_generation(state, gen0)
    while len(state.generations) - 1 < generations:
        if max_seconds is not None and state.elapsed_seconds >= max_seconds:
            logger.info("wall-time budget of %.0f s spent after %d generations", max_seconds, len(state.generations) - 1)
            break
        index = len(state.generations)
        z = optimizer.ask()
        gen = _generation(index, z, transform, evaluate)
        optimizer.tell(z, [c.fitness for c in gen.candidates])
        state.generations.append(gen)
        if save:
            save(state)
        if on_generation:
            on_generation(state, gen)
    return state
