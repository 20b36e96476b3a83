"""The coordinator's state in SQLite (stdlib ``sqlite3``, WAL): experts, fetches, verdicts,
evaluations, rounds, steps and jobs.

Every step of a round is a row in ``steps`` with its status and typed result
(:mod:`coordinator.steps`); a restarted coordinator reads them and skips what is ``done``. Per-expert work (fetch, verdict, evaluation) is keyed by manifest
hash, so it is never redone for the same bytes. One :class:`StateDB` per thread or process
(connections are not shared); writes are short transactions, so the worker process can write
job progress while the coordinator reads it. Every read returns a frozen row type
(:class:`ExpertRow`, :class:`RoundRow`, ...) with its JSON columns decoded; no other module
issues SQL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Json, ValidationError

from coordinator.jobspec import JOB_SPEC, RESULTS, JobResult, JobSpec
from coordinator.steps import STEPS, RoundState, StepResult
from umm.errors import UmmError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experts (
    manifest_hash TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    domains TEXT NOT NULL,
    address TEXT NOT NULL,
    record TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fetches (
    manifest_hash TEXT PRIMARY KEY,
    status TEXT NOT NULL,            -- done | failed | rejected
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS verdicts (
    manifest_hash TEXT PRIMARY KEY,
    admitted INTEGER NOT NULL,
    reason TEXT NOT NULL,
    architecture TEXT NOT NULL DEFAULT '',
    tokenizer TEXT NOT NULL DEFAULT '',
    num_parameters INTEGER NOT NULL DEFAULT 0,
    decided_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS evaluations (
    manifest_hash TEXT NOT NULL,
    benchmark TEXT NOT NULL,         -- key of the task set, split, limits and seed
    split TEXT NOT NULL,
    scores TEXT NOT NULL,            -- JSON {task: score}
    seconds REAL NOT NULL,
    evaluated_at REAL NOT NULL,
    PRIMARY KEY (manifest_hash, benchmark)
);
CREATE TABLE IF NOT EXISTS ranks (
    round INTEGER NOT NULL,
    domain TEXT NOT NULL,
    rank INTEGER NOT NULL,
    manifest_hash TEXT NOT NULL,
    score REAL NOT NULL,
    PRIMARY KEY (round, domain, manifest_hash)
);
CREATE TABLE IF NOT EXISTS rounds (
    number INTEGER PRIMARY KEY,
    state TEXT NOT NULL,             -- running | published | no_improvement | failed | verified
    phase TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL DEFAULT 0,
    method TEXT NOT NULL DEFAULT '',
    sources TEXT NOT NULL DEFAULT '[]',
    merged_hash TEXT NOT NULL DEFAULT '',
    recipe_hash TEXT NOT NULL DEFAULT '',
    scores TEXT NOT NULL DEFAULT '{}',
    objective REAL NOT NULL DEFAULT 0,
    previous_objective REAL NOT NULL DEFAULT 0,
    published INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS steps (
    round INTEGER NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,            -- running | done | failed
    result TEXT NOT NULL DEFAULT '{}',
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (round, name)
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,              -- combine | admit | evaluate
    spec TEXT NOT NULL,
    status TEXT NOT NULL,            -- pending | running | done | failed
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    pid INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    failure TEXT NOT NULL DEFAULT ''  -- a failed job's kind of failure (JobFailure)
);
"""


class StateError(UmmError):
    """The state database cannot be used (newer schema, corrupt file, a row this version cannot read)."""


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class ExpertRow(_Row):
    """An announced expert; ``record`` is its announcement as read from the DHT (self-reported)."""

    manifest_hash: str
    owner: str
    name: str
    domains: Json[list[str]]
    address: str
    record: Json[dict[str, Any]]
    first_seen: float
    last_seen: float


class FetchRow(_Row):
    """The last fetch of an expert: ``attempts`` counts every try."""

    manifest_hash: str
    status: Literal["done", "failed", "rejected"]
    attempts: int
    error: str
    updated_at: float


class VerdictRow(_Row):
    """Admitted or rejected (``reason``), with the identity admission found in the files."""

    manifest_hash: str
    admitted: bool
    reason: str
    architecture: str
    tokenizer: str
    num_parameters: int
    decided_at: float


class EvaluationRow(_Row):
    """Scores per task of one model under one benchmark key (:func:`coordinator.round.benchmark_key`)."""

    manifest_hash: str
    benchmark: str
    split: str
    scores: Json[dict[str, float]]
    seconds: float
    evaluated_at: float


class RankRow(_Row):
    round: int
    domain: str
    rank: int
    manifest_hash: str
    score: float


class RoundRow(_Row):
    """A round: its state and current phase (step), and what its merge made."""

    number: int
    state: RoundState
    phase: str
    started_at: float
    finished_at: float
    method: str
    sources: Json[list[str]]
    merged_hash: str
    recipe_hash: str
    scores: Json[dict[str, float]]
    objective: float
    previous_objective: float
    published: bool
    reason: str


class StepRow(_Row):
    """A step of a round; ``result`` is set once it is ``done``."""

    round: int
    name: str
    status: Literal["running", "done", "failed"]
    result: StepResult | None
    started_at: float
    finished_at: float
    attempts: int


#: Why a job failed: ``error`` (the worker raised), ``out_of_memory`` (it ran out of its memory
#: limit, or the kernel killed it with SIGKILL), ``exited``/``killed`` (the process ended without
#: a verdict: an exit code, another signal), ``timeout`` (stopped after the job timeout), ``stopped``
#: (with the coordinator).
JobFailure = Literal["", "error", "out_of_memory", "exited", "killed", "timeout", "stopped"]


class JobRow(_Row):
    """A job for a worker process; ``result`` (the type of its kind) is set once it is ``done``."""

    id: int
    round: int
    kind: str
    spec: JobSpec
    status: Literal["pending", "running", "done", "failed"]
    progress: float
    message: str
    result: JobResult | None
    pid: int
    created_at: float
    updated_at: float
    #: why a ``failed`` job failed ("" otherwise), set by the worker or by its supervisor
    failure: JobFailure = ""


R = TypeVar("R", bound=_Row)

#: the columns a caller may set on a round (``sources`` and ``scores`` are stored as JSON) or a job
_ROUND_FIELDS = frozenset(RoundRow.model_fields) - {"number", "started_at"}
_JOB_FIELDS = frozenset({"status", "progress", "message", "pid", "failure"})



def _row(cls: type[R], row: sqlite3.Row | None, **decoders: Callable[[str], Any]) -> R | None:
    """``row`` as ``cls``, the columns named in ``decoders`` decoded by them first (the others as
    ``cls`` declares); :class:`StateError` when it does not fit."""
    if row is None:
        return None
    data = dict(row)
    try:
        for column, decode in decoders.items():
            data[column] = decode(data[column])
        return cls.model_validate(data)
    except (ValidationError, KeyError, ValueError) as e:
        raise StateError(f"a row of {cls.__name__} in the state database cannot be read: {e}") from None


def _result(cls: type[BaseModel], text: str) -> Any:
    """A JSON result column: None before the result is written."""
    value = json.loads(text) if text else None
    return None if not value else cls.model_validate(value)


class StateDB:
    """Typed access to ``state.db``: every read returns frozen rows (see module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.conn.executescript(_SCHEMA)  # idempotent; executescript commits by itself
        if "failure" not in {r[1] for r in self.conn.execute("PRAGMA table_info(jobs)")}:  # a state.db from before it
            self.conn.execute("ALTER TABLE jobs ADD COLUMN failure TEXT NOT NULL DEFAULT ''")
            self.conn.commit()
        with self.tx() as c:  # a state.db from before rounds could end "no_improvement" called it "not_better"
            c.execute("UPDATE rounds SET state='no_improvement' WHERE state='not_better'")
        with self.tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StateError(
                    f"{self.path} has schema version {row[0]}, newer than this umm ({SCHEMA_VERSION}); upgrade umm"
                )

    @property
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            try:
                c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.DatabaseError as e:
                raise StateError(f"cannot open the state database {self.path}: {e}") from None
            c.row_factory = sqlite3.Row
            self._local.conn = c
        return c

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    def _all(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self.conn.execute(sql, args).fetchall()

    def _one(self, sql: str, args: tuple = ()) -> sqlite3.Row | None:
        return self.conn.execute(sql, args).fetchone()

    # experts ------------------------------------------------------------------------------
    def upsert_expert(self, manifest_hash: str, owner: str, name: str, domains: list[str], address: str,
                      record: dict[str, Any]) -> None:
        now = time.time()
        with self.tx() as c:
            c.execute(
                "INSERT INTO experts VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(manifest_hash) DO UPDATE SET "
                "owner=excluded.owner, name=excluded.name, domains=excluded.domains, address=excluded.address, "
                "record=excluded.record, last_seen=excluded.last_seen",
                (manifest_hash, owner, name, json.dumps(domains), address, json.dumps(record), now, now),
            )

    def expert(self, manifest_hash: str) -> ExpertRow | None:
        return _row(ExpertRow, self._one("SELECT * FROM experts WHERE manifest_hash=?", (manifest_hash,)))

    def experts(self) -> list[ExpertRow]:
        return [_row(ExpertRow, r) for r in self._all("SELECT * FROM experts ORDER BY first_seen")]

    # fetches -------------------------------------------------------------------------------
    def record_fetch(self, manifest_hash: str, status: str, error: str = "") -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO fetches VALUES (?,?,1,?,?) ON CONFLICT(manifest_hash) DO UPDATE SET "
                "status=excluded.status, attempts=fetches.attempts+1, error=excluded.error, updated_at=excluded.updated_at",
                (manifest_hash, status, error, time.time()),
            )

    def fetch(self, manifest_hash: str) -> FetchRow | None:
        return _row(FetchRow, self._one("SELECT * FROM fetches WHERE manifest_hash=?", (manifest_hash,)))

    # verdicts ------------------------------------------------------------------------------
    def record_verdict(self, manifest_hash: str, admitted: bool, reason: str, *, architecture: str = "",
                       tokenizer: str = "", num_parameters: int = 0) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?,?,?)",
                (manifest_hash, int(admitted), reason, architecture, tokenizer, num_parameters, time.time()),
            )

    def verdict(self, manifest_hash: str) -> VerdictRow | None:
        return _row(VerdictRow, self._one("SELECT * FROM verdicts WHERE manifest_hash=?", (manifest_hash,)))

    def verdicts(self) -> dict[str, VerdictRow]:
        rows = [_row(VerdictRow, r) for r in self._all("SELECT * FROM verdicts")]
        return {r.manifest_hash: r for r in rows}

    # evaluations ---------------------------------------------------------------------------
    def record_evaluation(self, manifest_hash: str, benchmark: str, split: str, scores: dict[str, float],
                          seconds: float) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?,?,?,?,?,?)",
                (manifest_hash, benchmark, split, json.dumps(scores), seconds, time.time()),
            )

    def evaluation(self, manifest_hash: str, benchmark: str) -> EvaluationRow | None:
        return _row(EvaluationRow, self._one("SELECT * FROM evaluations WHERE manifest_hash=? AND benchmark=?",
                                             (manifest_hash, benchmark)))

    def evaluations(self, benchmark: str) -> dict[str, EvaluationRow]:
        rows = [_row(EvaluationRow, r) for r in self._all("SELECT * FROM evaluations WHERE benchmark=?", (benchmark,))]
        return {r.manifest_hash: r for r in rows}

    # ranks -----------------------------------------------------------------------------------
    def record_ranks(self, round_: int, ranks: list[tuple[str, int, str, float]]) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM ranks WHERE round=?", (round_,))
            c.executemany("INSERT INTO ranks VALUES (?,?,?,?,?)", [(round_, *r) for r in ranks])

    def latest_ranks(self) -> list[RankRow]:
        """Ranks of the latest round that has any, best first per domain."""
        rows = self._all("SELECT * FROM ranks WHERE round=(SELECT MAX(round) FROM ranks) ORDER BY domain, rank")
        return [_row(RankRow, r) for r in rows]

    # rounds ------------------------------------------------------------------------------------
    def start_round(self) -> int:
        with self.tx() as c:
            row = c.execute("SELECT COALESCE(MAX(number), 0) FROM rounds").fetchone()
            number = int(row[0]) + 1
            c.execute("INSERT INTO rounds (number, state, phase, started_at) VALUES (?, 'running', 'discover', ?)",
                      (number, time.time()))
        return number

    def unfinished_round(self) -> int | None:
        row = self._one("SELECT number FROM rounds WHERE state='running' ORDER BY number DESC LIMIT 1")
        return int(row["number"]) if row else None

    def update_round(self, number: int, **fields: Any) -> None:
        """Set columns of round ``number`` (any of :class:`RoundRow`'s but its key and start)."""
        if not fields:
            return
        unknown = set(fields) - _ROUND_FIELDS
        if unknown:
            raise StateError(f"rounds have no settable column {', '.join(sorted(unknown))}")
        enc = {k: json.dumps(v) if k in ("sources", "scores") else v for k, v in fields.items()}
        cols = ", ".join(f"{k}=?" for k in enc)
        with self.tx() as c:
            c.execute(f"UPDATE rounds SET {cols} WHERE number=?", (*enc.values(), number))

    def round(self, number: int) -> RoundRow | None:
        return _row(RoundRow, self._one("SELECT * FROM rounds WHERE number=?", (number,)))

    def rounds(self, limit: int = 0) -> list[RoundRow]:
        sql = "SELECT * FROM rounds ORDER BY number DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [_row(RoundRow, r) for r in self._all(sql)]

    def last_published_round(self, before: int | None = None) -> RoundRow | None:
        sql = "SELECT * FROM rounds WHERE published=1"
        args: tuple = ()
        if before is not None:
            sql += " AND number<?"
            args = (before,)
        return _row(RoundRow, self._one(sql + " ORDER BY number DESC LIMIT 1", args))

    # steps -------------------------------------------------------------------------------------
    def step(self, round_: int, name: str) -> StepRow | None:
        return _step(self._one("SELECT * FROM steps WHERE round=? AND name=?", (round_, name)))

    def steps(self, round_: int) -> list[StepRow]:
        return [_step(r) for r in self._all("SELECT * FROM steps WHERE round=? ORDER BY started_at", (round_,))]

    def latest_done_step(self, name: str) -> StepRow | None:
        """The finished step ``name`` of the latest round that has one."""
        return _step(self._one("SELECT * FROM steps WHERE name=? AND status='done' ORDER BY round DESC LIMIT 1",
                               (name,)))

    def begin_step(self, round_: int, name: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO steps (round, name, status, started_at) VALUES (?,?,'running',?) "
                "ON CONFLICT(round, name) DO UPDATE SET status='running', attempts=steps.attempts+1",
                (round_, name, time.time()),
            )
            c.execute("UPDATE rounds SET phase=? WHERE number=?", (name, round_))

    def finish_step(self, round_: int, name: str, result: StepResult, status: str = "done") -> None:
        if not isinstance(result, STEPS[name]):
            raise TypeError(f"step {name} gives a {STEPS[name].__name__}, not a {type(result).__name__}")
        with self.tx() as c:
            c.execute("UPDATE steps SET status=?, result=?, finished_at=? WHERE round=? AND name=?",
                      (status, result.model_dump_json(), time.time(), round_, name))

    # jobs ----------------------------------------------------------------------------------------
    def create_job(self, round_: int, spec: JobSpec) -> int:
        now = time.time()
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO jobs (round, kind, spec, status, created_at, updated_at) VALUES (?,?,?,'pending',?,?)",
                (round_, spec.kind, spec.model_dump_json(), now, now),
            )
            return int(cur.lastrowid)

    def job(self, job_id: int) -> JobRow | None:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _row(JobRow, row, spec=JOB_SPEC.validate_json,
                    result=lambda text: _result(RESULTS[row["kind"]], text))

    def round_job(self, round_: int) -> JobRow | None:
        row = self._one("SELECT id FROM jobs WHERE round=? ORDER BY id DESC LIMIT 1", (round_,))
        return self.job(int(row["id"])) if row else None

    def current_job(self) -> JobRow | None:
        row = self._one("SELECT id FROM jobs WHERE status IN ('pending','running') ORDER BY id DESC LIMIT 1")
        return self.job(int(row["id"])) if row else None

    def update_job(self, job_id: int, *, result: JobResult | None = None, **fields: Any) -> None:
        """Set ``status``, ``progress``, ``message``, ``pid`` and, when done, ``result`` of job ``job_id``."""
        unknown = set(fields) - _JOB_FIELDS
        if unknown:
            raise StateError(f"jobs have no settable column {', '.join(sorted(unknown))}")
        if result is not None:
            fields["result"] = result.model_dump_json()
        fields["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        with self.tx() as c:
            c.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))


def _step(row: sqlite3.Row | None) -> StepRow | None:
    return _row(StepRow, row, result=lambda text: _result(STEPS[row["name"]], text)) if row is not None else None
