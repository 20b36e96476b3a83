"""The heavy-job worker process: ``python -m coordinator.worker STATE_DB JOB_ID``.

Reads the job's spec from the state database, runs it (``combine``: the round's merge,
:func:`umm.combine.run.run_combine`, resumable stage by stage in its run folder), writes progress
into the job row and, at the end, ``status='done'`` with its result
(:class:`~umm.combine.run.CombineResult`). An error is
written as ``status='failed'`` with its message; a crash is noticed by :mod:`coordinator.jobs`.

The round also runs the admission (``admit``) and evaluation (``evaluate``) of each stranger's
model here (:func:`coordinator.round.run_in_worker`), so that a model which crashes, hangs or
exhausts memory takes down only its worker. A spec's ``memory_limit`` caps the worker's address
space (:func:`limit_memory`) before the job starts.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from coordinator.db import StateDB, StateError
from coordinator.jobspec import Admission, AdmitJob, CombineJob, EvaluateJob, JobResult, Scores
from umm.combine.run import CombineResult

logger = logging.getLogger(__name__)


class _JobProgress:
    """:class:`umm.combine.run.CombineEvents` that write the stage into the job row (the status
    service shows it)."""

    def __init__(self, db: StateDB, job_id: int, stages: int) -> None:
        self.db, self.job_id, self.stages, self.done = db, job_id, max(stages, 1), 0

    def stage(self, name: str, detail: str = "") -> None:
        self.db.update_job(self.job_id, progress=min(0.95, self.done / self.stages),
                           message=f"{name}: {detail}"[:500] if detail else name)
        self.done += 1

    def note(self, text: str) -> None:
        logger.info("%s", text)

    def warning(self, text: str) -> None:
        logger.warning("%s", text)

    def dropped(self, dropped: Any) -> None:
        logger.warning("fusion source %s dropped: %s", dropped.source, dropped.reason)

    def result(self, result: Any) -> None:
        logger.info("decision: %s", result.decision.text)


def run_combine_job(db: StateDB, job_id: int, spec: CombineJob) -> CombineResult:
    """The round's merge, resumed from its run folder when a previous worker left one."""
    from umm.combine.run import STAGES, run_combine
    from umm.ui import Bars

    resume = spec.run_dir.exists() and any(spec.run_dir.iterdir())
    return run_combine(spec.combine_config(), spec.run_dir, resume=resume,
                       events=_JobProgress(db, job_id, len(STAGES)), on_progress=Bars())


def run_admit_job(db: StateDB, job_id: int, spec: AdmitJob) -> Admission:
    """Admission of one stranger's folder: refused with the reason for a typed refusal, else its
    identity. Anything else (a crash, running out of memory) fails the job."""
    from umm.checkpoints.admission import AdmissionLimits, admit
    from umm.errors import UmmError
    from umm.ui import Bars

    limits = AdmissionLimits(max_total_bytes=spec.max_total_bytes, budget=spec.budget)
    try:
        report = admit(spec.path, limits, on_progress=Bars())
    except UmmError as e:
        return Admission(admitted=False, reason=str(e).splitlines()[0][:1000])
    fp = report.fingerprint
    return Admission(admitted=True, architecture=fp.architecture, tokenizer=fp.tokenizer or "",
                     num_parameters=report.num_parameters)


def run_evaluate_job(db: StateDB, job_id: int, spec: EvaluateJob) -> Scores:
    """The coordinator's benchmark on one model folder."""
    from coordinator.round import evaluate_here

    return Scores(scores=evaluate_here(spec))


RUNNERS: dict[str, Callable[[StateDB, int, Any], JobResult]] = {
    "combine": run_combine_job, "admit": run_admit_job, "evaluate": run_evaluate_job}


def limit_memory(limit: int | None) -> None:
    """Cap this process's address space (``RLIMIT_AS``) at ``limit`` bytes: past it, allocations
    fail (MemoryError) instead of the machine swapping or the OOM killer picking a victim."""
    if not limit:
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(limit) if hard == resource.RLIM_INFINITY else min(int(limit), hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


#: how libraries without a typed error say they hit the address-space limit: torch's CPU allocator
#: (a plain RuntimeError), the dynamic loader and safetensors' mmap (ImportError/OSError text)
_ALLOCATION_FAILED = ("can't allocate memory", "Cannot allocate memory", "out of memory", "failed to map segment")


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means the worker ran out of its memory limit: by type where the raiser has
    one (``MemoryError``, ``OSError`` with ``ENOMEM``, torch's ``OutOfMemoryError``), else by the
    untyped libraries' wording (:data:`_ALLOCATION_FAILED`), here at the boundary only: the
    coordinator reads the job's typed ``failure``. The errors it was raised from count too (a loader
    that wraps torch's failure in a :class:`~umm.checkpoints.errors.CheckpointError`)."""
    import errno

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM):
            return True
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
            return True
        if isinstance(e, (RuntimeError, OSError, ImportError)) and any(m in str(e) for m in _ALLOCATION_FAILED):
            return True
        e = e.__cause__ or e.__context__
    return False


def run(db_path: str, job_id: int) -> int:
    db = StateDB(db_path)
    try:
        job = db.job(job_id)
    except StateError as e:  # e.g. a spec this version cannot read
        db.update_job(job_id, status="failed", pid=os.getpid(), message=str(e)[:2000])
        return 1
    if job is None:
        logger.error("no job %d in %s", job_id, db_path)
        return 2
    db.update_job(job_id, status="running", pid=os.getpid(), message=f"{job.kind}: starting")
    try:
        limit_memory(job.spec.memory_limit)
        result = RUNNERS[job.spec.kind](db, job_id, job.spec)
    except Exception as e:  # recorded for the coordinator; the process still exits non-zero
        logger.exception("job %d failed", job_id)
        db.update_job(job_id, status="failed", message=f"{type(e).__name__}: {e}"[:2000],
                      failure="out_of_memory" if out_of_memory(e) else "error")
        return 1
    db.update_job(job_id, status="done", progress=1.0, result=result, message=f"{job.kind}: done")
    return 0


def main(argv: list[str] | None = None) -> None:
    from umm.ui import setup_logging

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m coordinator.worker STATE_DB JOB_ID", file=sys.stderr)
        raise SystemExit(2)
    setup_logging(1)
    raise SystemExit(run(args[0], int(args[1])))


if __name__ == "__main__":
    main()
