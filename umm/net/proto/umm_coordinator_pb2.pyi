from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("network", "coordinator_public_key", "software_version", "current_round", "phase", "experts_known", "experts_admitted", "merged_manifest_hash", "checkpoint_address", "updated_at")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SOFTWARE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_KNOWN_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_ADMITTED_FIELD_NUMBER: _ClassVar[int]
    MERGED_MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    network: str
    coordinator_public_key: str
    software_version: str
    current_round: int
    phase: str
    experts_known: int
    experts_admitted: int
    merged_manifest_hash: str
    checkpoint_address: str
    updated_at: float
    def __init__(self, network: _Optional[str] = ..., coordinator_public_key: _Optional[str] = ..., software_version: _Optional[str] = ..., current_round: _Optional[int] = ..., phase: _Optional[str] = ..., experts_known: _Optional[int] = ..., experts_admitted: _Optional[int] = ..., merged_manifest_hash: _Optional[str] = ..., checkpoint_address: _Optional[str] = ..., updated_at: _Optional[float] = ...) -> None: ...

class LeaderboardRequest(_message.Message):
    __slots__ = ("domain", "limit")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    domain: str
    limit: int
    def __init__(self, domain: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class LeaderboardEntry(_message.Message):
    __slots__ = ("domain", "rank", "manifest_hash", "name", "score", "owner", "merged")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    domain: str
    rank: int
    manifest_hash: str
    name: str
    score: float
    owner: str
    merged: bool
    def __init__(self, domain: _Optional[str] = ..., rank: _Optional[int] = ..., manifest_hash: _Optional[str] = ..., name: _Optional[str] = ..., score: _Optional[float] = ..., owner: _Optional[str] = ..., merged: _Optional[bool] = ...) -> None: ...

class Leaderboard(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LeaderboardEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[LeaderboardEntry, _Mapping]]] = ...) -> None: ...

class ListRoundsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class Round(_message.Message):
    __slots__ = ("number", "state", "phase", "started_at", "finished_at", "method", "source_manifest_hashes", "merged_manifest_hash", "recipe_hash", "scores", "objective", "previous_objective", "published", "reason", "comparison", "plan", "stages", "pivot_manifest_hash", "previous_manifest_hash", "decision")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_MANIFEST_HASHES_FIELD_NUMBER: _ClassVar[int]
    MERGED_MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    RECIPE_HASH_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PIVOT_MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    number: int
    state: str
    phase: str
    started_at: float
    finished_at: float
    method: str
    source_manifest_hashes: _containers.RepeatedScalarFieldContainer[str]
    merged_manifest_hash: str
    recipe_hash: str
    scores: _containers.ScalarMap[str, float]
    objective: float
    previous_objective: float
    published: bool
    reason: str
    comparison: RoundComparison
    plan: str
    stages: _containers.RepeatedScalarFieldContainer[str]
    pivot_manifest_hash: str
    previous_manifest_hash: str
    decision: Decision
    def __init__(self, number: _Optional[int] = ..., state: _Optional[str] = ..., phase: _Optional[str] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., method: _Optional[str] = ..., source_manifest_hashes: _Optional[_Iterable[str]] = ..., merged_manifest_hash: _Optional[str] = ..., recipe_hash: _Optional[str] = ..., scores: _Optional[_Mapping[str, float]] = ..., objective: _Optional[float] = ..., previous_objective: _Optional[float] = ..., published: _Optional[bool] = ..., reason: _Optional[str] = ..., comparison: _Optional[_Union[RoundComparison, _Mapping]] = ..., plan: _Optional[str] = ..., stages: _Optional[_Iterable[str]] = ..., pivot_manifest_hash: _Optional[str] = ..., previous_manifest_hash: _Optional[str] = ..., decision: _Optional[_Union[Decision, _Mapping]] = ...) -> None: ...

class Difference(_message.Message):
    __slots__ = ("diff", "ci_low", "ci_high")
    DIFF_FIELD_NUMBER: _ClassVar[int]
    CI_LOW_FIELD_NUMBER: _ClassVar[int]
    CI_HIGH_FIELD_NUMBER: _ClassVar[int]
    diff: float
    ci_low: float
    ci_high: float
    def __init__(self, diff: _Optional[float] = ..., ci_low: _Optional[float] = ..., ci_high: _Optional[float] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("published", "text", "margin", "best_source_manifest_hash", "vs_best_source", "vs_previous")
    PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    BEST_SOURCE_MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    VS_BEST_SOURCE_FIELD_NUMBER: _ClassVar[int]
    VS_PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    published: bool
    text: str
    margin: float
    best_source_manifest_hash: str
    vs_best_source: Difference
    vs_previous: Difference
    def __init__(self, published: _Optional[bool] = ..., text: _Optional[str] = ..., margin: _Optional[float] = ..., best_source_manifest_hash: _Optional[str] = ..., vs_best_source: _Optional[_Union[Difference, _Mapping]] = ..., vs_previous: _Optional[_Union[Difference, _Mapping]] = ...) -> None: ...

class ModelScores(_message.Message):
    __slots__ = ("manifest_hash", "scores", "objective", "family")
    class ScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MANIFEST_HASH_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    manifest_hash: str
    scores: _containers.ScalarMap[str, float]
    objective: float
    family: str
    def __init__(self, manifest_hash: _Optional[str] = ..., scores: _Optional[_Mapping[str, float]] = ..., objective: _Optional[float] = ..., family: _Optional[str] = ...) -> None: ...

class RoundComparison(_message.Message):
    __slots__ = ("merged", "sources")
    MERGED_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    merged: ModelScores
    sources: _containers.RepeatedCompositeFieldContainer[ModelScores]
    def __init__(self, merged: _Optional[_Union[ModelScores, _Mapping]] = ..., sources: _Optional[_Iterable[_Union[ModelScores, _Mapping]]] = ...) -> None: ...

class RoundList(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedCompositeFieldContainer[Round]
    def __init__(self, rounds: _Optional[_Iterable[_Union[Round, _Mapping]]] = ...) -> None: ...
