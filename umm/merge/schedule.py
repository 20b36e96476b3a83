"""The thread scheduler: run jobs on a small pool while their estimated memory fits a budget.

Owns concurrency and nothing else: a job is any object with an ``est_bytes`` attribute, and what
running it means is the caller's ``work`` function. Workers overlap reading, computing and
writing (torch releases the GIL), but a job only starts when its estimate fits in the budget
alongside the jobs already running; a job larger than the budget runs alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Protocol, TypeVar

#: Estimated working memory the pool may hold at once; a larger single job runs alone.
DEFAULT_MEMORY_BUDGET = 512 * 2**20


class Estimated(Protocol):
    """What the scheduler needs of a job: its estimated peak working memory."""

    @property
    def est_bytes(self) -> int: ...


J = TypeVar("J", bound=Estimated)


class _Budget:
    """Admits jobs while their estimated memory fits; one oversized job may run alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    def try_take(self, n: int) -> bool:
        """Reserve ``n`` bytes if they fit (always, when nothing runs)."""
        with self.cond:
            if self.used and self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        """Release ``n`` bytes reserved by :meth:`try_take`."""
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def run_jobs(
    jobs: Iterable[J],
    work: Callable[[J], None],
    *,
    workers: int,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    on_done: Callable[[J], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run ``work(job)`` for every job, in order of submission, on ``workers`` threads.

    ``on_done(job)`` is called from this thread as each job finishes. The first error stops
    submission, sets ``stop`` (so running jobs may skip their work), cancels the jobs not yet
    started and is raised here once the pool has stopped.
    """
    budget = _Budget(memory_budget)

    def run(job: J) -> J:
        try:
            work(job)
            return job
        finally:
            budget.give(job.est_bytes)

    pending: set[Future] = set()
    it = iter(jobs)
    nxt = next(it, None)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="umm-merge") as pool:
        try:
            while nxt is not None or pending:
                while nxt is not None and len(pending) < workers and budget.try_take(nxt.est_bytes):
                    pending.add(pool.submit(run, nxt))
                    nxt = next(it, None)
                if not pending:
                    continue
                finished, pending = wait(pending, timeout=None, return_when=FIRST_COMPLETED)
                for f in finished:
                    job = f.result()  # re-raises a job's error
                    if on_done is not None:
                        on_done(job)
        except BaseException:
            if stop is not None:
                stop.set()
            for f in pending:
                f.cancel()
            raise
