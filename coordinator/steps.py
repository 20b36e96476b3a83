"""The result of each step of a round: one frozen type per step, stored as JSON in the ``steps`` table.

:data:`STEPS` lists the steps in the order a round runs them, each with its result type; a
restarted coordinator reads a finished step's result back as that type (:meth:`StateDB.step`)
and reuses it. A result that is :class:`Ending` with ``end_round`` set ends the round in
``state``, for ``reason``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from coordinator.planner import Plan
from umm.combine.decision import Decision
from umm.combine.run import CombineResult

#: a round's state: ``running`` until a step ends it
#: (``no_improvement``: the merged model did not clear the bar, or nothing new could raise it)
RoundState = Literal["running", "published", "no_improvement", "failed", "verified"]


class StepResult(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Ending(StepResult):
    """A result that may end the round: ``end_round``, then the round's final ``state`` and why."""

    end_round: bool = False
    state: RoundState = "running"
    reason: str = ""


class DiscoverStep(StepResult):
    """The experts announced on the DHT (manifest hashes, sorted)."""

    experts: list[str]


class FetchStep(StepResult):
    """This round's fetch set: in the store or quarantine, failed (retried later), or rejected."""

    fetched: list[str]
    failed: list[str]
    rejected: list[str]


class AdmitStep(StepResult):
    """The fetched experts, by verdict."""

    admitted: list[str]
    rejected: list[str]


class EvaluateStep(StepResult):
    """Admitted experts scored on the search split (``failed``: rejected since their evaluation failed)."""

    evaluated: list[str]
    failed: list[str]


class RankStep(StepResult):
    """Ranks ``(domain, rank, manifest hash, score)`` and the signed scores record as published."""

    ranks: list[tuple[str, int, str, float]]
    published: bool
    record: dict[str, Any]

    def scores_record(self) -> Any:
        """The published :class:`umm.net.records.ScoresRecord`."""
        from umm.net.records import ScoresRecord, parse_record

        return parse_record(ScoresRecord, self.record)


class PlanStep(Plan, Ending):
    """The round's plan; a plan of kind ``none`` ends the round ``verified``."""


class JobStep(Ending):
    """The round's job (its id in the ``jobs`` table) and, when it is done, what it made."""

    job: int
    output: CombineResult | None = None


class EvaluateResultStep(StepResult):
    """The merged model's scores on the test split beside its sources' and the previous published
    model's (by manifest hash), as the job's comparison measured them: scores per task, the
    objective of each (:func:`coordinator.round.objective`), each model's family, and the job's
    publish decision (paired-bootstrap intervals against the best source and the previous model)."""

    manifest_hash: str
    scores: dict[str, float]
    objective: float
    source_scores: dict[str, dict[str, float]]
    source_objectives: dict[str, float]
    families: dict[str, str] = {}
    decision: Decision | None = None


class PublishStep(Ending):
    """Always ends the round: ``published`` (with the signed merged record) or ``no_improvement``."""

    dht_stored: bool = False
    record: dict[str, Any] | None = None

    def merged_record(self) -> Any:
        """The published :class:`umm.net.records.MergedRecord` (None when nothing was published)."""
        from umm.net.records import MergedRecord, parse_record

        return None if self.record is None else parse_record(MergedRecord, self.record)


#: the steps in the order a round runs them (DESIGN.md "A round"), with their result types
STEPS: dict[str, type[StepResult]] = {
    "discover": DiscoverStep, "fetch": FetchStep, "admit": AdmitStep, "evaluate": EvaluateStep, "rank": RankStep,
    "plan": PlanStep, "job": JobStep, "evaluate_result": EvaluateResultStep, "publish": PublishStep,
}


@dataclass
class RoundResults:
    """The results of a round's steps so far (each later step reads the earlier ones')."""

    discover: DiscoverStep | None = None
    fetch: FetchStep | None = None
    admit: AdmitStep | None = None
    evaluate: EvaluateStep | None = None
    rank: RankStep | None = None
    plan: PlanStep | None = None
    job: JobStep | None = None
    evaluate_result: EvaluateResultStep | None = None
    publish: PublishStep | None = None
