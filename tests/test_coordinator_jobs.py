"""Heavy jobs in a worker process, and the publish-if-better decision."""

from __future__ import annotations

import os
import signal
import threading
import time

from coordinator.config import EvolveSettings, parse_config
from coordinator.db import StateDB
from coordinator.jobs import run_job
from coordinator.jobspec import EvolveJob, MergeOutput
from coordinator.round import RoundContext, RoundRunner
from coordinator.steps import EvaluateResultStep, JobStep, PlanStep, RoundResults


def evolve_job(tmp_path, *models: str) -> EvolveJob:
    """A merge search over ``models`` (folders that need not exist: the worker then fails)."""
    return EvolveJob(models=[tmp_path / m for m in models], tasks=["synth-math"], search_size=2, test_size=2,
                     device="cpu", seed=0, run_dir=tmp_path / "run", settings=EvolveSettings())


def test_worker_error_is_a_failed_job(tmp_path):
    db = StateDB(tmp_path / "state.db")
    job = db.create_job(1, evolve_job(tmp_path, "no-such-model-a", "no-such-model-b"))
    row = run_job(db, job, log_dir=tmp_path / "logs", timeout=120, poll=0.1)
    assert row.status == "failed" and "no-such-model-a" in row.message
    assert row.pid not in (0, os.getpid())
    assert "Traceback" in (tmp_path / "logs" / f"job-{job}.log").read_text()  # the worker's log keeps the details


def test_killed_worker_is_a_failed_job_and_the_coordinator_goes_on(tmp_path):
    db = StateDB(tmp_path / "state.db")
    job = db.create_job(1, evolve_job(tmp_path, "x", "y"))
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("row", run_job(db, job, log_dir=tmp_path, timeout=120,
                                                                      poll=0.05)))
    t.start()
    other = StateDB(tmp_path / "state.db")
    deadline = time.monotonic() + 60
    while other.job(job).pid == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(other.job(job).pid, signal.SIGKILL)
    t.join(60)
    assert out["row"].status == "failed" and "killed by signal 9" in out["row"].message


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
    ev = EvaluateResultStep(manifest_hash=h, scores={"synth-math": 0.5}, objective=0.5,
                            source_scores={"a" * 64: {"synth-math": 0.4}, "b" * 64: {"synth-math": 0.3}},
                            source_objectives={"a" * 64: 0.4, "b" * 64: 0.3})
    results = RoundResults(
        plan=PlanStep(kind="evolve", sources=["a" * 64, "b" * 64]),
        job=JobStep(job=1, output=MergeOutput(model_dir=tiny_models["math"], recipe_hash="c" * 64, method="linear")),
        evaluate_result=ev)
    r1 = db.start_round()
    out = runner.step_publish(r1, results)
    assert out.state == "published" and "first merged model" in out.reason
    assert out.merged_record().sources == ["a" * 64, "b" * 64] and out.merged_record().method == "linear"
    assert records.merged[0].manifest_hash == h and records.merged[0].round == r1
    assert records.providers == [(h, "127.0.0.1:5000")] and runner.ctx.store.has(h)
    db.update_round(r1, state="published", objective=0.5)

    r2 = db.start_round()
    worse = RoundResults(plan=results.plan, job=results.job, evaluate_result=ev.model_copy(update={"objective": 0.5}))
    out = runner.step_publish(r2, worse)
    assert out.state == "not_better" and "0.5000 does not beat round 1's 0.5000" in out.reason
    assert out.record is None and len(records.merged) == 1 and db.round(r2).previous_objective == 0.5


def test_fusion_job_trains_the_pivot_in_a_worker(tiny_models, tmp_path):
    import json

    from coordinator.jobspec import FusionJob
    from umm.checkpoints.fingerprint import fingerprint
    from umm.checkpoints.reader import Checkpoint
    from umm.experts.random_models import make_random_neox
    from umm.fusion.settings import TrainingSettings

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i}.", "response": f"{2 * i}"}) + "\n"
                            for i in range(4)))
    neox = make_random_neox(tmp_path / "neox", seed=5)
    db = StateDB(tmp_path / "state.db")
    spec = FusionJob(pivot=tiny_models["base"], sources=[neox], data=data, output=tmp_path / "out",
                     work_dir=tmp_path / "work", device="cpu", max_length=64, training=TrainingSettings(max_steps=1))
    job = db.create_job(1, spec)
    assert db.job(job).spec == spec  # read back as it was written
    row = run_job(db, job, log_dir=tmp_path / "logs", timeout=300, poll=0.2)
    assert row.status == "done", row.message
    assert row.result.method == "fusion" and row.progress == 1.0
    with Checkpoint.open(row.result.model_dir) as out, Checkpoint.open(tiny_models["base"]) as pivot:
        assert fingerprint(out).architecture == fingerprint(pivot).architecture  # the pivot, trained


def test_status_phase_shows_the_running_jobs_progress(tmp_path):
    from coordinator.status import _phase_text

    db = StateDB(tmp_path / "state.db")
    assert _phase_text(db) == (0, "idle")
    n = db.start_round()
    db.begin_step(n, "job")
    job = db.create_job(n, evolve_job(tmp_path, "a", "b"))
    db.update_job(job, status="running", progress=0.25, message="evolve: generation 1/4, 3 candidates")
    assert _phase_text(db) == (1, f"job {job} (evolve): 25% evolve: generation 1/4, 3 candidates")


def test_restarted_coordinator_waits_for_a_live_worker_and_restarts_a_dead_one(tmp_path):
    import subprocess

    db = StateDB(tmp_path / "state.db")
    live = subprocess.Popen(["sleep", "30"])  # stands for a worker that outlived a killed coordinator
    try:
        job = db.create_job(1, evolve_job(tmp_path, "a", "b"))
        db.update_job(job, status="running", pid=live.pid)
        made = MergeOutput(model_dir=tmp_path / "m", recipe_hash="r", method="linear")
        threading.Timer(0.5, lambda: StateDB(tmp_path / "state.db").update_job(
            job, status="done", result=made)).start()
        row = run_job(db, job, log_dir=tmp_path / "logs", timeout=60, poll=0.05)
        assert row.status == "done" and row.result == made
        assert row.pid == live.pid and not (tmp_path / "logs").exists()
    finally:
        live.kill()
        live.wait()
    job2 = db.create_job(2, evolve_job(tmp_path, "no-such-model-c", "d"))
    db.update_job(job2, status="running", pid=live.pid)  # that worker is gone: the job is run again
    row = run_job(db, job2, log_dir=tmp_path / "logs", timeout=60, poll=0.05)
    assert row.pid != live.pid and (tmp_path / "logs" / f"job-{job2}.log").is_file()
    assert row.status == "failed" and "no-such-model-c" in row.message


def test_out_of_memory_is_recognised_by_type_and_only_untyped_libraries_by_wording():
    import errno

    from coordinator.worker import out_of_memory

    assert out_of_memory(MemoryError())
    assert out_of_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert out_of_memory(ImportError("libtorch_cpu.so: failed to map segment from shared object"))
    assert not out_of_memory(RuntimeError("shape mismatch"))
    assert not out_of_memory(ValueError("the expert says: out of memory"))  # a value, not an allocator
    try:  # a loader that wraps the allocator's failure, as umm.checkpoints.loading does
        try:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        except RuntimeError:
            raise ValueError("transformers cannot load this model") from None
    except ValueError as wrapped:
        assert out_of_memory(wrapped)


def test_a_state_db_from_before_the_failure_column_opens_and_its_jobs_read_back(tmp_path):
    import sqlite3

    path = tmp_path / "state.db"
    db = StateDB(path)
    job_id = db.create_job(0, evolve_job(tmp_path, "a", "b"))
    db.close()
    with sqlite3.connect(path) as c:  # the jobs table as the previous version created it
        c.execute("ALTER TABLE jobs DROP COLUMN failure")
    db = StateDB(path)
    assert db.job(job_id).failure == ""
    db.update_job(job_id, status="failed", message="x", failure="timeout")
    assert db.job(job_id).failure == "timeout"
    db.close()
