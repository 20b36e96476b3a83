"""Heavy jobs in a worker *process* (``python -m coordinator.worker``), watched from the coordinator.

:func:`run_job` starts the worker for a job row (or, after a coordinator restart, waits for a
worker that is still alive), polls the database for its progress and returns the finished row.
A worker that dies (signal, out of memory, exception) leaves the job ``failed`` with the reason;
the coordinator itself keeps running.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from coordinator.db import JobRow, StateDB

logger = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def start_worker(db: StateDB, job_id: int, log_dir: Path) -> subprocess.Popen:
    """Start ``python -m coordinator.worker`` for ``job_id``; its output goes to ``log_dir/job-<id>.log``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"job-{job_id}.log", "ab")
    env = dict(os.environ)
    env.setdefault("UMM_NO_PROGRESS", "1")
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.worker", str(db.path), str(job_id)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
    finally:
        log.close()
    db.update_job(job_id, status="running", pid=proc.pid)
    logger.info("job %d: worker process %d started", job_id, proc.pid)
    return proc


def run_job(db: StateDB, job_id: int, *, log_dir: Path, timeout: float, poll: float = 0.5,
            stop: threading.Event | None = None) -> JobRow:
    """Run (or keep waiting for) job ``job_id`` until it is done or failed; returns its row."""
    job = db.job(job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    if job.status in ("done", "failed"):
        return job
    proc: subprocess.Popen | None = None
    if job.status == "running" and _alive(job.pid):
        logger.info("job %d: worker %d still running, waiting for it", job_id, job.pid)
        pid = job.pid
    else:
        proc = start_worker(db, job_id, log_dir)
        pid = proc.pid
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            code = proc.poll()
            alive = code is None
        else:
            code, alive = None, _alive(pid)
        job = db.job(job_id)
        assert job is not None
        if job.status in ("done", "failed"):
            if proc is not None:
                proc.wait()
            return job
        if not alive:
            why = (f"worker process exited with code {code}" if code is not None and code >= 0
                   else f"worker process killed by signal {-code}" if code is not None
                   else "worker process died")
            # SIGKILL that we did not send: the kernel's OOM killer
            failure = ("out_of_memory" if code == -signal.SIGKILL else "killed" if code is not None and code < 0
                       else "exited")
            db.update_job(job_id, status="failed", message=f"{why}; last progress: {job.message}"[:2000],
                          failure=failure)
            return db.job(job_id)  # type: ignore[return-value]
        if time.monotonic() > deadline or (stop is not None and stop.is_set()):
            if stop is not None and stop.is_set():
                # coordinator shutting down: leave the worker; a restart waits for it again
                return job
            try:  # the worker leads its own process group (start_new_session): end it with its children
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if proc is not None:
                proc.wait()
            db.update_job(job_id, status="failed", message=f"stopped after the job timeout of {timeout:.0f} s",
                          failure="timeout")
            return db.job(job_id)  # type: ignore[return-value]
        time.sleep(poll)
