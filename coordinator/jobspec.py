"""What a worker process is asked to do (:data:`JobSpec`) and what it answers (:data:`JobResult`).

A job row (:mod:`coordinator.db`) holds one spec, serialized as JSON by pydantic, and, once done,
the result of its kind. The round's heavy job is a :class:`CombineJob`: the library's
:func:`umm.combine.run.run_combine` (fusion of other families into the pivot's, CMA-ES merge of
the family, the test comparison and the publish decision), with the config's ``evolve``,
``fusion`` and ``margin`` nested unchanged. Each stranger's model is admitted (:class:`AdmitJob`) and scored
(:class:`EvaluateJob`) in a worker too, so a hostile model costs only its worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from umm.checkpoints.budget import ModelBudget
from umm.combine.config import CombineConfig, CombineSettings
from umm.combine.run import CombineResult


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Job(_Frozen):
    #: address-space limit of the worker in bytes (:func:`coordinator.worker.limit_memory`); None: none
    memory_limit: int | None = None


class CombineJob(_Job):
    """The round's merge (:func:`umm.combine.run.run_combine`), resumable stage by stage in
    ``run_dir``: ``models`` (the experts, ``pivot`` among them), onto ``base_model`` when it is of
    the pivot's family; ``previous`` (the published merged model) is a candidate and the bar."""

    kind: Literal["combine"] = "combine"
    models: list[Path] = Field(min_length=1)
    pivot: Path
    base_model: Path | None = None
    previous: Path | None = None
    tasks: list[str] = Field(min_length=1)
    #: task -> weight in the objective (default: equal)
    weights: dict[str, float] = Field(default_factory=dict)
    search_size: int | None
    test_size: int | None
    batch_size: int = 16
    max_new_tokens: int | None = None
    device: str
    seed: int
    run_dir: Path
    settings: CombineSettings

    def combine_config(self) -> CombineConfig:
        """The library's config of this job."""
        return CombineConfig.model_validate({
            **self.settings.model_dump(), "models": [str(m) for m in self.models], "pivot": str(self.pivot),
            "base_model": None if self.base_model is None else str(self.base_model),
            "previous": None if self.previous is None else str(self.previous),
            "tasks": [{"name": t, "weight": self.weights.get(t, 1.0), "search_size": self.search_size,
                       "test_size": self.test_size} for t in self.tasks],
            "seed": self.seed, "device": self.device, "eval_batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens,
        })


class AdmitJob(_Job):
    """Admission of one stranger's folder (:func:`umm.checkpoints.admission.admit`)."""

    kind: Literal["admit"] = "admit"
    path: Path
    max_total_bytes: int
    budget: ModelBudget


class EvaluateJob(_Job):
    """The coordinator's benchmark on one model folder: ``limit`` items of ``split`` per task."""

    kind: Literal["evaluate"] = "evaluate"
    path: Path
    split: Literal["search", "test"]
    tasks: list[str]
    seed: int
    limit: int | None
    batch_size: int
    max_new_tokens: int | None
    device: str
    #: generation back end (umm.eval.backends); absent in jobs written before it existed
    backend: str = "loop"


JobSpec = Annotated[CombineJob | AdmitJob | EvaluateJob, Field(discriminator="kind")]
JOB_SPEC: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)


class Admission(_Frozen):
    """An admission's answer: ``admitted`` with the folder's identity, or refused with the ``reason``."""

    admitted: bool
    reason: str = ""
    architecture: str = ""
    tokenizer: str = ""
    num_parameters: int = 0


class Scores(_Frozen):
    """An evaluation's answer: score per task."""

    scores: dict[str, float]


JobResult = CombineResult | Admission | Scores
#: the result type of each job kind
RESULTS: dict[str, type[JobResult]] = {"combine": CombineResult, "admit": Admission, "evaluate": Scores}
