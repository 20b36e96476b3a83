"""The search state saved after every generation, as JSON (never pickle).

A ``cma`` strategy object could be pickled, but loading pickle runs code, so we never do it.
Instead the state holds what determines the strategy completely: its settings (seed, starting
point, step size, population) and, per finished generation, every vector it asked and the
fitness it was told. :mod:`umm.evolve.search` rebuilds the strategy by replaying those
generations into a fresh one and checks that each replayed ``ask`` returns the stored vectors, so
a resumed search continues exactly where the killed one stopped.

Floats are written with Python's ``repr`` by :mod:`json`, which round-trips float64 exactly.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umm.atomic import write_json_atomic
from umm.errors import UmmError

logger = logging.getLogger(__name__)

STATE_VERSION = 1
STATE_FILE = "search_state.json"


class ResumeError(UmmError):
    """A run folder cannot be resumed (no state, another config, or a state that does not replay)."""


@dataclass
class Candidate:
    """One evaluated genome: its unbounded vector ``z``, its values ``x`` and its scores."""

    generation: int
    index: int
    z: list[float]
    x: list[float]
    scores: dict[str, float]
    fitness: float
    seconds: float
    apply_seconds: float = 0.0


def rank_key(c: Candidate) -> float:
    """Fitness for ranking: a failed (NaN) candidate ranks below every other."""
    return c.fitness if math.isfinite(c.fitness) else -math.inf


@dataclass
class Generation:
    index: int
    candidates: list[Candidate]
    seconds: float

    @property
    def best(self) -> Candidate:
        return max(self.candidates, key=rank_key)


@dataclass
class SearchState:
    """Settings that fix the optimizer plus every finished generation (generation 0 = start point)."""

    optimizer: str
    seed: int
    dimension: int
    population: int
    sigma0: float
    z0: list[float]
    generations: list[Generation] = field(default_factory=list)
    version: int = STATE_VERSION

    def settings(self) -> dict[str, Any]:
        """What must be equal for a state to be resumed under a config."""
        return {
            "optimizer": self.optimizer,
            "seed": self.seed,
            "dimension": self.dimension,
            "population": self.population,
            "sigma0": self.sigma0,
            "z0": self.z0,
        }

    @property
    def evaluations(self) -> int:
        return sum(len(g.candidates) for g in self.generations)

    @property
    def elapsed_seconds(self) -> float:
        return sum(g.seconds for g in self.generations)

    def best(self) -> Candidate | None:
        cands = [c for g in self.generations for c in g.candidates]
        return max(cands, key=rank_key) if cands else None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchState:
        try:
            if data.get("version") != STATE_VERSION:
                raise ResumeError(f"search state version {data.get('version')} is not {STATE_VERSION}")
            gens = [
                Generation(
                    index=int(g["index"]),
                    seconds=float(g["seconds"]),
                    candidates=[Candidate(**c) for c in g["candidates"]],
                )
                for g in data["generations"]
            ]
            return cls(
                optimizer=str(data["optimizer"]),
                seed=int(data["seed"]),
                dimension=int(data["dimension"]),
                population=int(data["population"]),
                sigma0=float(data["sigma0"]),
                z0=[float(v) for v in data["z0"]],
                generations=gens,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ResumeError(f"search state is malformed: {exc}") from None


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN/Inf as None: JSON has none; a failed candidate's fitness is stored as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


def save_state(run_dir: Path, state: SearchState) -> Path:
    """Persist the state (atomically) into ``run_dir``."""
    path = Path(run_dir) / STATE_FILE
    write_json_atomic(path, json_safe(state.to_json()))
    logger.debug("saved search state: %d generations, %d evaluations", len(state.generations), state.evaluations)
    return path


def load_state(run_dir: Path) -> SearchState:
    """Read the state of a run folder; :class:`ResumeError` if it is missing or malformed."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise ResumeError(f"nothing to resume: {path} does not exist (start without --resume)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ResumeError(f"{path}: cannot read the search state: {exc}") from None
    state = SearchState.from_json(data)
    for g in state.generations:
        for c in g.candidates:
            if c.fitness is None:  # stored NaN
                c.fitness = float("nan")
    return state
