"""The dashboard API's response types: every answer is one of these, serialised by pydantic.

Values that come from contributors (expert names, domains, reasons quoting them) are plain strings
here; the page writes them with ``textContent`` only, so they never become markup.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApiError(_Out):
    """A refused request: its HTTP status and why (never a traceback)."""

    status: int
    error: str


class Identity(_Out):
    """Who serves this dashboard: the network, the coordinator's public key (the one nodes trust),
    its checkpoint and status service addresses and its software version."""

    network: str
    public_key: str
    checkpoint_address: str
    status_address: str
    version: str


class ModelRef(_Out):
    """A model by manifest hash, with its short form and its announced name ("" if unknown)."""

    manifest_hash: str
    short_hash: str
    name: str


class LeaderRow(_Out):
    """One expert on the leaderboard. ``rank``/``score``: the coordinator's own (search split; None when
    unranked); ``ci_low``/``ci_high``: the score's confidence interval when the state holds one;
    ``verdict``: ``admitted``, ``rejected`` or ``pending`` (no verdict yet), with its ``reason``."""

    model: ModelRef
    domain: str
    rank: int | None
    score: float | None
    ci_low: float | None = None
    ci_high: float | None = None
    verdict: str
    reason: str
    owner: str


class DomainBoard(_Out):
    domain: str
    rows: list[LeaderRow]


class MergedModel(_Out):
    """The latest published merged model: the round that made it and its test objective."""

    model: ModelRef
    round: int
    method: str
    objective: float


class Leaderboard(_Out):
    """Ranked experts per domain (latest ranks), experts without a rank (rejected or pending) and
    the published merged model."""

    ranked_in_round: int | None
    domains: list[DomainBoard]
    unranked: list[LeaderRow]
    merged: MergedModel | None


class RoundSummary(_Out):
    """A round as listed: ``state`` (running, published, no_improvement, not_better, failed,
    verified, ...) and the step it is in (``stage``)."""

    number: int
    state: str
    stage: str
    started_at: float
    finished_at: float
    method: str
    merged: ModelRef | None
    objective: float | None
    published: bool
    reason: str


class Rounds(_Out):
    rounds: list[RoundSummary]


class StepView(_Out):
    name: str
    status: str
    started_at: float
    finished_at: float
    attempts: int


class Stage(_Out):
    """A stage of the plan (``fuse``, ``evolve``, ...) and the models it uses."""

    name: str
    models: list[ModelRef]
    detail: str = ""


class PlanView(_Out):
    """What the round merges, and how; ``reason`` when it merges nothing."""

    kind: str
    stages: list[Stage]
    pivot: ModelRef | None
    reason: str


class Figure(_Out):
    """A number the decision rests on, with its confidence interval when there is one."""

    name: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None


class Decision(_Out):
    """How the round ended: published or not, in words, and its figures."""

    published: bool
    state: str
    text: str
    figures: list[Figure]


class ModelScores(_Out):
    """A model's scores per task on the test split, and its objective."""

    role: str  # merged | source
    model: ModelRef
    scores: dict[str, float]
    objective: float


class Comparison(_Out):
    """The merged model beside its sources, per task (``tasks``: the columns, in order)."""

    tasks: list[str]
    models: list[ModelScores]


class JobView(_Out):
    id: int
    kind: str
    status: str
    progress: float
    message: str
    failure: str


class RoundDetail(_Out):
    round: RoundSummary
    steps: list[StepView]
    plan: PlanView | None
    decision: Decision | None
    comparison: Comparison | None
    jobs: list[JobView]


class Point(_Out):
    x: float
    y: float


class Series(_Out):
    name: str
    points: list[Point]


class Curve(_Out):
    """One job's curves: ``series`` over ``x_label`` (generation, step)."""

    job: JobView
    title: str
    x_label: str
    y_label: str
    series: list[Series]


class Curves(_Out):
    """The CMA-ES fitness curve of the round's (last) evolve job and the loss curve of its (last)
    fusion job; None where the round had no such job or it has no data yet."""

    round: int
    evolve: Curve | None
    fusion: Curve | None


class NodeView(_Out):
    """A peer: an expert's node (its announced name, address, domains) or a provider of the merged model."""

    role: str  # expert | provider
    name: str
    address: str
    owner: str
    model: ModelRef | None
    domains: list[str]
    last_seen: float | None


class Nodes(_Out):
    """The experts' nodes (from the state DB) and the merged model's providers (from the DHT's
    provider records; ``providers_error`` says why they could not be read)."""

    merged: ModelRef | None
    providers: list[NodeView]
    providers_error: str
    experts: list[NodeView]
