"""The ``umm evolve`` configuration: one frozen pydantic model read from a YAML file.

Unknown keys are errors whose message lists the valid keys of that section, so a typo never
silently falls back to a default. See ``examples/evolve.yaml`` for every key, commented.

The fitness of a candidate (and the objective of every model in the final table) is the
weighted mean of its task scores, ``sum_t weight_t * score_t / sum_t weight_t``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from umm import configfile
from umm.errors import UmmError
from umm.eval.backends import Backend
from umm.eval.generate import DEFAULT_BACKEND

#: Default search bounds per method parameter (``weight`` may exceed 1 only if widened here).
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "weight": (0.0, 1.0),
    "density": (0.1, 1.0),
    "t": (0.0, 1.0),
}


class EvolveConfigError(UmmError):
    """The evolve config file is missing, unreadable or invalid."""


class TaskSpec(configfile.Strict):
    """One task of the fitness: its evaluator name, weight and subset sizes."""

    name: str
    #: weight of the task in the objective (a weighted mean: only the ratios of weights matter)
    weight: float = 1.0
    #: items of the ``search`` split used for every candidate (fixed, seeded subset)
    search_size: int | None = Field(default=64, ge=1)
    #: items of the ``test`` split in the final table (``None``: all of them)
    test_size: int | None = Field(default=None, ge=1)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0:
            raise ValueError("task weight must be a finite number >= 0")
        return v


def check_task_specs(tasks: list[TaskSpec]) -> None:
    """Raise ``ValueError`` when a task is listed twice or no task has a weight > 0."""
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"tasks listed twice: {', '.join(dup)}")
    if sum(t.weight for t in tasks) <= 0:
        raise ValueError("at least one task must have a weight > 0")


class Budget(configfile.Strict):
    """When to stop: after ``evaluations`` candidates or ``seconds`` of wall time, whichever first."""

    evaluations: int = 100
    seconds: float | None = None

    @field_validator("evaluations")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError(f"budget.evaluations must be at least 1 (got {v}): a search needs candidates")
        return v

    @field_validator("seconds")
    @classmethod
    def _positive_seconds(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"budget.seconds must be > 0 or null (got {v})")
        return v


#: the baselines of the final table that are not sources (``random``: a second search)
Baseline = Literal["task_arithmetic", "ties", "random"]


class EvolveSettings(configfile.Strict):
    """How a search runs, whatever it merges and scores: the method, its genes and bounds, the
    optimizer and its budget, dtypes. A coordinator's ``evolve`` section is this type; a config
    file adds what to merge and how to score (:class:`EvolveConfig`)."""

    method: str = "task_arithmetic"
    #: parameters of the method that are searched (default: every per-tensor parameter of the method)
    search_params: list[str] | None = None
    #: fixed global parameters of the method (e.g. ``normalize``, ``lambda``)
    global_params: dict[str, Any] = Field(default_factory=dict)
    #: layers per group: 1 = one gene per layer, ``num_layers`` = one gene for the whole model
    layer_granularity: int = Field(default=1, ge=1)
    #: optional name filters with their own genes (e.g. ``[self_attn, mlp]``)
    filters: list[str] = Field(default_factory=list)
    bounds: dict[str, tuple[float, float]] = Field(default_factory=dict)
    budget: Budget = Field(default_factory=Budget)
    optimizer: Literal["cma", "random"] = "cma"
    #: candidates per generation (``None``: CMA-ES's default 4 + 3 ln(n))
    population: int | None = Field(default=None, ge=2)
    #: initial step size in the unbounded search space (logit units)
    sigma0: float = Field(default=0.7, gt=0)
    #: dtype of the live model and of the precomputed tensors (``float32`` or ``bfloat16``...)
    dtype: str = "float32"
    batch_size: int = Field(default=16, ge=1)
    #: who generates the candidates' completions: ``loop``/``hf`` (PyTorch), ``vllm`` (one vLLM
    #: engine whose weights each candidate replaces in memory; ``umm[vllm]``, a CUDA GPU) or
    #: ``auto`` (vLLM when it can run and load the model, else PyTorch); see :mod:`umm.eval.backends`
    backend: Backend = DEFAULT_BACKEND
    #: dtype of the written merged model
    out_dtype: str | None = None
    #: Ray cluster whose actors score each generation's candidates in parallel (``auto``: the
    #: cluster of ``$RAY_ADDRESS`` or the one last started on this machine; ``host:port``;
    #: ``None``: this process, on its own devices). Needs ``umm[ray]``; the models must be at the
    #: same paths on every node.
    ray: str | None = None
    #: Ray actors (``None``: one per GPU of the cluster for a CUDA device, else one per ``ray_threads`` CPUs)
    ray_actors: int | None = Field(default=None, ge=1)
    #: torch threads of each Ray actor (and the CPUs it reserves on a CPU search)
    ray_threads: int = Field(default=1, ge=1)

    @field_validator("bounds")
    @classmethod
    def _bounds(cls, v: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
        for name, (lo, hi) in v.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"bounds.{name} must be [low, high] with low < high (got [{lo}, {hi}])")
        return v


class EvolveConfig(EvolveSettings):
    """Everything a search needs: its :class:`EvolveSettings`, the models, the tasks of the
    fitness, and what the run writes; paths are resolved relative to the config file."""

    models: list[str] = Field(min_length=1)
    base_model: str | None = None
    #: starting point: ``uniform`` or the path of a recipe YAML
    start: str = "uniform"
    tasks: list[TaskSpec] = Field(min_length=1)
    seed: int = 0
    device: str = "auto"
    #: write the merged model of the best recipe into the run folder
    write_model: bool = True
    #: score the sources and the baselines on ``test`` for the final table
    compare: bool = True
    #: baselines of the final table: untuned task arithmetic (every weight 1), TIES at the
    #: method's default density (1, as mergekit's), random search with the same budget and seed
    #: (run only with ``compare``: its result is a row of the final table)
    baselines: list[Baseline] = Field(default_factory=lambda: ["task_arithmetic", "ties", "random"])

    @field_validator("baselines")
    @classmethod
    def _baselines_unique(cls, v: list[str]) -> list[str]:
        dup = sorted({b for b in v if v.count(b) > 1})
        if dup:
            raise ValueError(f"baselines listed twice: {', '.join(dup)}")
        return v

    @model_validator(mode="after")
    def _tasks_unique(self) -> EvolveConfig:
        check_task_specs(self.tasks)
        return self

    def bounds_for(self, param: str) -> tuple[float, float]:
        """Search interval of a method parameter (config value, else the default, else [0, 1])."""
        if param in self.bounds:
            return tuple(self.bounds[param])  # type: ignore[return-value]
        return DEFAULT_BOUNDS.get(param, (0.0, 1.0))

    def population_size(self, dimension: int) -> int:
        """Candidates per generation for a genome of ``dimension`` genes."""
        if self.population is not None:
            return self.population
        return 4 + int(3 * math.log(max(dimension, 1)))


_SECTIONS: dict[str, type[BaseModel]] = {"": EvolveConfig, "budget": Budget, "tasks": TaskSpec}
#: the keys that hold paths (read by the path rule of :mod:`umm.configfile`)
_PATH_KEYS = ("models", "base_model")


def expand_task_names(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each task given by its name alone (``tasks: [synth-math]``) as ``{name: ...}``."""
    if isinstance(data.get("tasks"), list):
        return {**data, "tasks": [{"name": t} if isinstance(t, str) else t for t in data["tasks"]]}
    return data


def parse_config(data: Any, *, source: str = "<dict>", base_dir: Path | None = None) -> EvolveConfig:
    """Validate a mapping into an :class:`EvolveConfig`; relative paths (models, base model, start
    recipe) are relative to ``base_dir``, the config file's folder. Raises :class:`EvolveConfigError`
    with every problem listed."""
    if not isinstance(data, dict):
        raise EvolveConfigError(f"{source}: the config must be a YAML mapping (got {type(data).__name__})")
    data = configfile.resolve_paths(data, _PATH_KEYS, base_dir)
    data = expand_task_names(data)
    if isinstance(data.get("start"), str) and data["start"] != "uniform":
        data["start"] = configfile.resolve_path(data["start"], base_dir)
    try:
        return EvolveConfig.model_validate(data)
    except ValidationError as exc:
        raise EvolveConfigError(configfile.explain(exc, f"invalid evolve config {source}:", _SECTIONS)) from None


def load_config(path: str | Path, **overrides: Any) -> EvolveConfig:
    """Read a YAML config; ``overrides`` (e.g. ``optimizer="random"``) replace top-level keys."""
    return configfile.load_config(path, parse_config, EvolveConfigError, overrides=overrides)
