"""Heavy jobs in a worker process, and the publish-if-better decision."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from coordinator.config import parse_config
from coordinator.db import StateDB
from coordinator.jobs import run_job
from coordinator.round import RoundContext, RoundRunner, classify_transfer_error


def test_worker_error_is_a_failed_job(tmp_path):
    db = StateDB(tmp_path / "state.db")
    job = db.create_job(1, "evolve", {"models": [str(tmp_path / "missing-a"), str(tmp_path / "missing-b")],
                                      "tasks": ["synth-math"], "evaluations": 3, "population": 2,
                                      "run_dir": str(tmp_path / "run")})
    row = run_job(db, job, log_dir=tmp_path / "logs", timeout=120, poll=0.1)
    assert row["status"] == "failed" and "missing-a" in row["message"]
    assert row["pid"] not in (0, os.getpid())
    assert "missing-a" in (tmp_path / "logs" / f"job-{job}.log").read_text()


def test_killed_worker_is_a_failed_job_and_the_coordinator_goes_on(tmp_path):
    db = StateDB(tmp_path / "state.db")
    job = db.create_job(1, "evolve", {"models": ["x", "y"], "tasks": ["synth-math"], "run_dir": str(tmp_path / "r")})
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("row", run_job(db, job, log_dir=tmp_path, timeout=120,
                                                                      poll=0.05)))
    t.start()
    other = StateDB(tmp_path / "state.db")
    deadline = time.monotonic() + 60
    while other.job(job)["pid"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(other.job(job)["pid"], signal.SIGKILL)
    t.join(60)
    assert out["row"]["status"] == "failed" and "killed by signal 9" in out["row"]["message"]


class FakeRecords:
    def __init__(self):
        self.merged, self.providers = [], []

    def publish_merged(self, record, ttl):
        self.merged.append(record)
        return True

    def announce_provider(self, manifest_hash, address, ttl):
        self.providers.append((manifest_hash, address))
        return True


def test_publish_only_if_better_than_the_previous_round(tiny_models, tmp_path):
    from umm.checkpoints.manifest import build_manifest
    from umm.net.store import ModelStore

    cfg = parse_config({"data_dir": str(tmp_path), "tasks": ["synth-math"]})
    db = StateDB(tmp_path / "state.db")
    records = FakeRecords()
    runner = RoundRunner(RoundContext(cfg, db, ModelStore(tmp_path), records, "127.0.0.1:5000"))
    h = build_manifest(tiny_models["math"]).hash
    results = {"plan": {"kind": "evolve", "sources": ["a" * 64, "b" * 64], "pivot": ""},
               "job": {"model_dir": str(tiny_models["math"]), "recipe_hash": "c" * 64, "method": "linear"},
               "evaluate_result": {"manifest_hash": h, "scores": {"synth-math": 0.5}, "objective": 0.5,
                                   "source_scores": {"a" * 64: {"synth-math": 0.4}, "b" * 64: {"synth-math": 0.3}}}}
    r1 = db.start_round()
    out = runner.step_publish(r1, results)
    assert out["state"] == "published" and "first merged model" in out["reason"]
    assert records.merged[0].manifest_hash == h and records.merged[0].round == r1
    assert records.providers == [(h, "127.0.0.1:5000")] and runner.ctx.store.has(h)
    db.update_round(r1, state="published", objective=0.5)

    r2 = db.start_round()
    worse = {**results, "evaluate_result": {**results["evaluate_result"], "objective": 0.5}}
    out = runner.step_publish(r2, worse)
    assert out["state"] == "not_better" and "0.5000 does not beat round 1's 0.5000" in out["reason"]
    assert len(records.merged) == 1 and db.round(r2)["previous_objective"] == 0.5


@pytest.mark.parametrize("message,kind", [
    ("download of model x failed: file a: every provider was dropped\n  provider p: a: bytes do not match the manifest sha256", "rejected"),
    ("download of model x failed: could not get the manifest\n  provider p: UNAVAILABLE", "failed"),
    ("download of model x failed: file a: 3 failed attempts per provider\n  provider p: stream ended", "failed"),
])
def test_transfer_errors_reject_bad_bytes_and_retry_unreachable_providers(message, kind):
    from umm.net.errors import SizeLimitError, TransferError

    assert classify_transfer_error(TransferError(message))[0] == kind
    assert classify_transfer_error(SizeLimitError("model x is 2 MB, over the limit"))[1].startswith("too large")
