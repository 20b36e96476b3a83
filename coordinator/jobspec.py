"""What a worker process is asked to do (:data:`JobSpec`) and what it answers (:data:`JobResult`).

A job row (:mod:`coordinator.db`) holds one spec, serialized as JSON by pydantic, and, once done,
the result of its kind. The round's heavy job is an :class:`EvolveJob` or a :class:`FusionJob`
(:data:`MergeJob`); they nest the library's own settings unchanged (the config's ``evolve`` and
``fusion`` sections). Each stranger's model is admitted (:class:`AdmitJob`) and scored
(:class:`EvaluateJob`) in a worker too, so a hostile model costs only its worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from coordinator.config import EvolveSettings
from umm.checkpoints.budget import ModelBudget
from umm.fusion.settings import TrainingSettings


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Job(_Frozen):
    #: address-space limit of the worker in bytes (:func:`coordinator.worker.limit_memory`); None: none
    memory_limit: int | None = None


class EvolveJob(_Job):
    """A CMA-ES merge search over compatible experts (:func:`umm.evolve.run.run_evolve`), resumable
    in ``run_dir``."""

    kind: Literal["evolve"] = "evolve"
    models: list[Path] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    search_size: int | None
    test_size: int | None
    device: str
    seed: int
    run_dir: Path
    settings: EvolveSettings


class FusionJob(_Job):
    """The pivot trained on the sources' token distributions (:func:`umm.fusion.train.train_pivot`),
    resumable from its checkpoints in ``work_dir``; the model is written to ``output``."""

    kind: Literal["fusion"] = "fusion"
    pivot: Path
    sources: list[Path]
    data: Path
    output: Path
    work_dir: Path
    device: str
    max_length: int
    training: TrainingSettings


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


MergeJob = Annotated[EvolveJob | FusionJob, Field(discriminator="kind")]
JobSpec = Annotated[EvolveJob | FusionJob | AdmitJob | EvaluateJob, Field(discriminator="kind")]
JOB_SPEC: TypeAdapter[JobSpec] = TypeAdapter(JobSpec)


class MergeOutput(_Frozen):
    """What a merge job leaves: the model folder, the hash of its recipe, the method that made it."""

    model_dir: Path
    recipe_hash: str
    method: str


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


JobResult = MergeOutput | Admission | Scores
#: the result type of each job kind
RESULTS: dict[str, type[JobResult]] = {"evolve": MergeOutput, "fusion": MergeOutput, "admit": Admission,
                                       "evaluate": Scores}
