"""What a fusion run (:func:`umm.fusion.pipeline.run_fuse`) reports while it runs.

The pipeline prints nothing: it calls the methods of a :class:`FuseEvents`, whose base
implementation ignores everything. ``umm fuse`` shows them (stage titles, tables, warnings,
a training progress bar) with its own subclass, ``ConsoleFuseEvents``; tests subclass it to
collect what they check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from umm.fusion.pipeline import FuseConfig, FuseResult, TeacherInfo
    from umm.training import StepReport

#: the stages of a run, in order (see :mod:`umm.fusion.pipeline`)
STAGE_TITLES = (
    "checking inputs",
    "pivot",
    "teacher passes",
    "training the pivot on the fused distributions",
    "evaluation on the test split",
)


@dataclass(frozen=True)
class Stage:
    """Stage ``number`` (1-based) of :data:`STAGE_TITLES`; ``detail`` adds context (e.g. the tasks)."""

    number: int
    detail: str = ""

    @property
    def title(self) -> str:
        return STAGE_TITLES[self.number - 1]

    @property
    def total(self) -> int:
        return len(STAGE_TITLES)


class FuseEvents:
    """Receives a fusion run's progress; every method does nothing here (override what you show)."""

    def stage(self, stage: Stage) -> None:
        """A stage begins."""

    def note(self, text: str) -> None:
        """A plain progress message (what was read, chosen or written)."""

    def warning(self, text: str) -> None:
        """Something the user should fix or know (e.g. prompt layouts that differ between models)."""

    def candidates_scored(self, scores: dict[str, dict[str, float]], pivot: Path, domain: str) -> None:
        """The pivot search: model -> domain -> search-split score; ``pivot`` is best on ``domain``."""

    def teacher_passes(self, teachers: Sequence[TeacherInfo], cfg: FuseConfig) -> None:
        """The teacher passes are done (or were cached): their sizes and costs."""

    def training_step(self, report: StepReport) -> None:
        """One optimizer step of the pivot's training."""

    def results(self, result: FuseResult, tasks: Sequence[str]) -> None:
        """The final test-split scores of every model (``result.test``)."""
