"""Heavy jobs in a worker process, and the publish-only-improvements decision."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from coordinator.config import parse_config
from coordinator.db import StateDB
from coordinator.jobs import run_job
from coordinator.jobspec import CombineJob
from coordinator.round import RoundContext, RoundRunner
from coordinator.steps import EvaluateResultStep, JobStep, PlanStep, RoundResults
from umm.combine.config import CombineSettings


def evolve_job(tmp_path, *models: str) -> CombineJob:
    """A round's merge of ``models`` (folders that need not exist: the worker then fails)."""
    return CombineJob(models=[tmp_path / m for m in models], pivot=tmp_path / models[0], tasks=["synth-math"],
                      search_size=2, test_size=2, device="cpu", seed=0, run_dir=tmp_path / "run",
                      settings=CombineSettings())


def combine_result(model_dir, *, published: bool = True, sources=("a" * 64, "b" * 64)):
    """A finished job's result: ``model_dir`` merged from ``sources`` (store folders named by hash)."""
    from umm.combine.decision import Decision
    from umm.combine.plan import CombinePlan
    from umm.combine.run import CombineResult
    from umm.eval.stats import PairedDifference
    from umm.evolve.report import Comparison, ComparisonRow

    def row(name, kind, score, path):
        return ComparisonRow(name=name, kind=kind, scores={"synth-math": score}, objective=score,
                             n={"synth-math": 8}, ci={"synth-math": (0.0, 1.0)}, path=str(path))

    gain = PairedDifference(diff=0.1, ci_low=0.02 if published else -0.03, ci_high=0.2)
    comparison = Comparison(weights={"synth-math": 1.0}, best_source=f"source: {sources[0]}",
                            rows=[row("evolved", "evolved", 0.5, model_dir),
                                  *(row(f"source: {h}", "source", 0.4 - 0.1 * i, f"/store/{h}")
                                    for i, h in enumerate(sources))],
                            evolved_minus_best_source=gain, resamples=10, seed=0)
    decision = Decision(published=published, text="published: ..." if published else "no improvement: ...",
                        margin=0.0, best_source=f"/store/{sources[0]}", diff_vs_best_source=gain)
    plan = CombinePlan(pivot=f"/store/{sources[0]}", base=f"/store/{sources[0]}",
                       family=[f"/store/{h}" for h in sources], fuse=[], stages=["evolve"])
    return CombineResult(run_dir=model_dir.parent, model_dir=model_dir, plan=plan, fused={}, dropped=[],
                         recipe_hash="c" * 64, method="task_arithmetic", comparison=comparison, decision=decision)


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


def test_publish_only_what_the_jobs_decision_says_is_better(tiny_models, tmp_path):
    from umm.checkpoints.manifest import build_manifest
    from umm.combine.decision import Decision
    from umm.eval.stats import PairedDifference
    from umm.net.store import ModelStore

    cfg = parse_config({"data_dir": str(tmp_path), "tasks": ["synth-math"]})
    db = StateDB(tmp_path / "state.db")
    records = FakeRecords()
    runner = RoundRunner(RoundContext(cfg, db, ModelStore(tmp_path), records, "127.0.0.1:5000"))
    h = build_manifest(tiny_models["math"]).hash
    gain = PairedDifference(diff=0.1, ci_low=0.02, ci_high=0.2)
    ev = EvaluateResultStep(manifest_hash=h, scores={"synth-math": 0.5}, objective=0.5,
                            source_scores={"a" * 64: {"synth-math": 0.4}, "b" * 64: {"synth-math": 0.3}},
                            source_objectives={"a" * 64: 0.4, "b" * 64: 0.3},
                            decision=Decision(published=True, text="published: merged beats a by +0.100",
                                              margin=0.0, best_source="a", diff_vs_best_source=gain))
    results = RoundResults(plan=PlanStep(kind="evolve", sources=["b" * 64], pivot="a" * 64),
                           job=JobStep(job=1, output=combine_result(tiny_models["math"])), evaluate_result=ev)
    r1 = db.start_round()
    out = runner.step_publish(r1, results)
    assert out.state == "published" and out.reason == "published: merged beats a by +0.100"
    record = out.merged_record()
    assert record.sources == ["b" * 64, "a" * 64] and record.method == "task_arithmetic"
    assert record.decision == out.reason and record.diff_vs_best_source == [0.1, 0.02, 0.2]
    assert records.merged[0].manifest_hash == h and records.merged[0].round == r1
    assert records.providers == [(h, "127.0.0.1:5000")] and runner.ctx.store.has(h)
    db.update_round(r1, state="published", objective=0.5)

    r2 = db.start_round()
    no = ev.decision.model_copy(update={"published": False, "text": "no improvement over previous round 1"})
    out = runner.step_publish(r2, RoundResults(plan=results.plan, job=results.job,
                                               evaluate_result=ev.model_copy(update={"decision": no})))
    assert out.state == "no_improvement" and out.reason == "no improvement over previous round 1"
    assert out.record is None and len(records.merged) == 1 and db.round(r2).previous_objective == 0.5


def test_the_round_reads_the_jobs_comparison_by_manifest_hash(tiny_models, tmp_path):
    """evaluate_result maps the job's rows (store folders) back to manifest hashes; the plan step
    offers the published model as ``previous``, and the same experts again end ``no_improvement``."""
    from umm.checkpoints.manifest import build_manifest
    from umm.net.store import ModelStore

    cfg = parse_config({"data_dir": str(tmp_path), "tasks": ["synth-math"]})
    db = StateDB(tmp_path / "state.db")
    store = ModelStore(tmp_path)
    runner = RoundRunner(RoundContext(cfg, db, store, FakeRecords(), "127.0.0.1:5000"))
    a, b = "a" * 64, "b" * 64
    result = combine_result(tiny_models["math"], sources=(str(store.models_dir / a), str(store.models_dir / b)))
    plan = PlanStep(kind="evolve", sources=[b], pivot=a)
    r1 = db.start_round()
    ev = runner.step_evaluate_result(r1, RoundResults(plan=plan, job=JobStep(job=1, output=result)))
    assert ev.manifest_hash == build_manifest(tiny_models["math"]).hash and ev.objective == 0.5
    assert ev.source_objectives == {a: 0.4, b: pytest.approx(0.3)} and ev.decision == result.decision
    assert ev.families[ev.manifest_hash] == ev.families[a]  # the merged model is of the pivot's family
    assert db.round(r1).merged_hash == ev.manifest_hash and db.round(r1).method == "task_arithmetic"
def test_status_phase_shows_the_running_jobs_progress(tmp_path):
    from coordinator.status import _phase_text

    db = StateDB(tmp_path / "state.db")
    assert _phase_text(db) == (0, "idle")
    n = db.start_round()
    db.begin_step(n, "job")
    job = db.create_job(n, evolve_job(tmp_path, "a", "b"))
    db.update_job(job, status="running", progress=0.25, message="evolve: generation 1/4, 3 candidates")
    assert _phase_text(db) == (1, f"job {job} (combine): 25% evolve: generation 1/4, 3 candidates")


def test_restarted_coordinator_waits_for_a_live_worker_and_restarts_a_dead_one(tmp_path):
    import subprocess

    db = StateDB(tmp_path / "state.db")
    live = subprocess.Popen(["sleep", "30"])  # stands for a worker that outlived a killed coordinator
    try:
        job = db.create_job(1, evolve_job(tmp_path, "a", "b"))
        db.update_job(job, status="running", pid=live.pid)
        made = combine_result(tmp_path / "m")
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


def test_the_plan_offers_the_published_model_and_ends_without_new_experts(tiny_models, tmp_path):
    """The previously published model is the plan's ``previous`` (a candidate and the bar); the same
    experts as a finished round's merge end the round ``no_improvement`` before any job runs."""
    from coordinator.round import benchmark_key
    from coordinator.steps import EvaluateStep
    from umm.net.store import ModelStore

    cfg = parse_config({"data_dir": str(tmp_path), "tasks": ["synth-math", "synth-code"]})
    db = StateDB(tmp_path / "state.db")
    store = ModelStore(tmp_path)
    runner = RoundRunner(RoundContext(cfg, db, store, FakeRecords(), "127.0.0.1:5000"))
    a, b = "a" * 64, "b" * 64
    for h, scores in ((a, {"synth-math": 0.6, "synth-code": 0.1}), (b, {"synth-math": 0.1, "synth-code": 0.7})):
        db.record_verdict(h, True, "admitted", architecture="arch", tokenizer="tok", num_parameters=1)
        db.record_evaluation(h, benchmark_key(cfg, "search"), "search", scores, 1.0)
    results = RoundResults(evaluate=EvaluateStep(evaluated=[a, b], failed=[]))
    r1 = db.start_round()
    plan = runner.step_plan(r1, results)
    assert plan.kind == "evolve" and not plan.end_round and sorted(plan.models) == [a, b] and plan.previous == ""
    merged = store.add_folder(tiny_models["math"])  # what round 1 published
    db.update_round(r1, state="published", published=1, merged_hash=merged, objective=0.5)

    r2 = db.start_round()
    again = runner.step_plan(r2, results)
    assert again.previous == merged and again.end_round and again.state == "no_improvement"
    assert f"no new expert since round {r1}" in again.reason
