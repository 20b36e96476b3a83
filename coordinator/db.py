"""The coordinator's state in SQLite (stdlib ``sqlite3``, WAL): experts, fetches, verdicts,
evaluations, rounds, steps and jobs.

Every step of a round is a row in ``steps`` with its status; a restarted coordinator reads them
and skips what is ``done``. Per-expert work (fetch, verdict, evaluation) is keyed by manifest
hash, so it is never redone for the same bytes. One :class:`StateDB` per thread or process
(connections are not shared); writes are short transactions, so the worker process can write
job progress while the coordinator reads it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    state TEXT NOT NULL,             -- running | published | not_better | failed | verified
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
    kind TEXT NOT NULL,              -- evolve | fusion
    spec TEXT NOT NULL,
    status TEXT NOT NULL,            -- pending | running | done | failed
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    result TEXT NOT NULL DEFAULT '{}',
    pid INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""


class StateError(UmmError):
    """The state database cannot be used (newer schema, corrupt file)."""


def _loads(text: str) -> Any:
    return json.loads(text) if text else None


class StateDB:
    """Typed access to ``state.db``. Rows come back as dicts with JSON columns decoded."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self.conn.executescript(_SCHEMA)  # idempotent; executescript commits by itself
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

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute(sql, args).fetchall()]

    def _one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        r = self.conn.execute(sql, args).fetchone()
        return dict(r) if r is not None else None

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

    def expert(self, manifest_hash: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM experts WHERE manifest_hash=?", (manifest_hash,))
        if row:
            row["domains"] = _loads(row["domains"])
            row["record"] = _loads(row["record"])
        return row

    def experts(self) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM experts ORDER BY first_seen")
        for row in rows:
            row["domains"] = _loads(row["domains"])
            row["record"] = _loads(row["record"])
        return rows

    # fetches -------------------------------------------------------------------------------
    def record_fetch(self, manifest_hash: str, status: str, error: str = "") -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO fetches VALUES (?,?,1,?,?) ON CONFLICT(manifest_hash) DO UPDATE SET "
                "status=excluded.status, attempts=fetches.attempts+1, error=excluded.error, updated_at=excluded.updated_at",
                (manifest_hash, status, error, time.time()),
            )

    def fetch(self, manifest_hash: str) -> dict[str, Any] | None:
        return self._one("SELECT * FROM fetches WHERE manifest_hash=?", (manifest_hash,))

    # verdicts ------------------------------------------------------------------------------
    def record_verdict(self, manifest_hash: str, admitted: bool, reason: str, *, architecture: str = "",
                       tokenizer: str = "", num_parameters: int = 0) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO verdicts VALUES (?,?,?,?,?,?,?)",
                (manifest_hash, int(admitted), reason, architecture, tokenizer, num_parameters, time.time()),
            )

    def verdict(self, manifest_hash: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM verdicts WHERE manifest_hash=?", (manifest_hash,))
        if row:
            row["admitted"] = bool(row["admitted"])
        return row

    def verdicts(self) -> dict[str, dict[str, Any]]:
        rows = self._all("SELECT * FROM verdicts")
        for r in rows:
            r["admitted"] = bool(r["admitted"])
        return {r["manifest_hash"]: r for r in rows}

    # evaluations ---------------------------------------------------------------------------
    def record_evaluation(self, manifest_hash: str, benchmark: str, split: str, scores: dict[str, float],
                          seconds: float) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?,?,?,?,?,?)",
                (manifest_hash, benchmark, split, json.dumps(scores), seconds, time.time()),
            )

    def evaluation(self, manifest_hash: str, benchmark: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM evaluations WHERE manifest_hash=? AND benchmark=?", (manifest_hash, benchmark))
        if row:
            row["scores"] = _loads(row["scores"])
        return row

    def evaluations(self, benchmark: str) -> dict[str, dict[str, Any]]:
        rows = self._all("SELECT * FROM evaluations WHERE benchmark=?", (benchmark,))
        for r in rows:
            r["scores"] = _loads(r["scores"])
        return {r["manifest_hash"]: r for r in rows}

    # ranks -----------------------------------------------------------------------------------
    def record_ranks(self, round_: int, ranks: list[tuple[str, int, str, float]]) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM ranks WHERE round=?", (round_,))
            c.executemany("INSERT INTO ranks VALUES (?,?,?,?,?)", [(round_, *r) for r in ranks])

    def latest_ranks(self) -> list[dict[str, Any]]:
        """Ranks of the latest round that has any, best first per domain."""
        row = self._one("SELECT MAX(round) AS r FROM ranks")
        if not row or row["r"] is None:
            return []
        return self._all("SELECT * FROM ranks WHERE round=? ORDER BY domain, rank", (row["r"],))

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
        if not fields:
            return
        enc = {k: json.dumps(v) if k in ("sources", "scores") else v for k, v in fields.items()}
        cols = ", ".join(f"{k}=?" for k in enc)
        with self.tx() as c:
            c.execute(f"UPDATE rounds SET {cols} WHERE number=?", (*enc.values(), number))

    def round(self, number: int) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM rounds WHERE number=?", (number,))
        return self._decode_round(row) if row else None

    def rounds(self, limit: int = 0) -> list[dict[str, Any]]:
        sql = "SELECT * FROM rounds ORDER BY number DESC" + (f" LIMIT {int(limit)}" if limit else "")
        return [self._decode_round(r) for r in self._all(sql)]

    def last_published_round(self, before: int | None = None) -> dict[str, Any] | None:
        sql = "SELECT * FROM rounds WHERE published=1"
        args: tuple = ()
        if before is not None:
            sql += " AND number<?"
            args = (before,)
        row = self._one(sql + " ORDER BY number DESC LIMIT 1", args)
        return self._decode_round(row) if row else None

    @staticmethod
    def _decode_round(row: dict[str, Any]) -> dict[str, Any]:
        row["sources"] = _loads(row["sources"]) or []
        row["scores"] = _loads(row["scores"]) or {}
        row["published"] = bool(row["published"])
        return row

    # steps -------------------------------------------------------------------------------------
    def step(self, round_: int, name: str) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM steps WHERE round=? AND name=?", (round_, name))
        if row:
            row["result"] = _loads(row["result"])
        return row

    def steps(self, round_: int) -> list[dict[str, Any]]:
        rows = self._all("SELECT * FROM steps WHERE round=? ORDER BY started_at", (round_,))
        for r in rows:
            r["result"] = _loads(r["result"])
        return rows

    def begin_step(self, round_: int, name: str) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO steps (round, name, status, started_at) VALUES (?,?,'running',?) "
                "ON CONFLICT(round, name) DO UPDATE SET status='running', attempts=steps.attempts+1",
                (round_, name, time.time()),
            )
            c.execute("UPDATE rounds SET phase=? WHERE number=?", (name, round_))

    def finish_step(self, round_: int, name: str, result: Any, status: str = "done") -> None:
        with self.tx() as c:
            c.execute("UPDATE steps SET status=?, result=?, finished_at=? WHERE round=? AND name=?",
                      (status, json.dumps(result), time.time(), round_, name))

    # jobs ----------------------------------------------------------------------------------------
    def create_job(self, round_: int, kind: str, spec: dict[str, Any]) -> int:
        now = time.time()
        with self.tx() as c:
            cur = c.execute(
                "INSERT INTO jobs (round, kind, spec, status, created_at, updated_at) VALUES (?,?,?,'pending',?,?)",
                (round_, kind, json.dumps(spec), now, now),
            )
            return int(cur.lastrowid)

    def job(self, job_id: int) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM jobs WHERE id=?", (job_id,))
        if row:
            row["spec"] = _loads(row["spec"])
            row["result"] = _loads(row["result"])
        return row

    def round_job(self, round_: int) -> dict[str, Any] | None:
        row = self._one("SELECT id FROM jobs WHERE round=? ORDER BY id DESC LIMIT 1", (round_,))
        return self.job(int(row["id"])) if row else None

    def current_job(self) -> dict[str, Any] | None:
        row = self._one("SELECT id FROM jobs WHERE status IN ('pending','running') ORDER BY id DESC LIMIT 1")
        return self.job(int(row["id"])) if row else None

    def update_job(self, job_id: int, **fields: Any) -> None:
        enc = {k: json.dumps(v) if k in ("spec", "result") else v for k, v in fields.items()}
        enc["updated_at"] = time.time()
        cols = ", ".join(f"{k}=?" for k in enc)
        with self.tx() as c:
            c.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*enc.values(), job_id))
