"""Bounded shutdown steps shared by the node and the coordinator.

Leaving a network does blocking work whose length others decide: withdrawing records is a DHT
store that waits for peers (which may be leaving too, or be slow on a loaded machine), hivemind's
own shutdown waits for its process, a gRPC server waits for its calls. Each step here runs with a
deadline; a step past it is abandoned (its thread is a daemon, the process is about to end) and
the next one runs, so a stop takes at most the sum of the deadlines (about 20 s), and a few
seconds when the network answers. What an abandoned step
leaves is safe: a record not withdrawn expires within its TTL, a DHT process that did not shut
down is killed through its pid file (:func:`umm.net.dht.end_orphaned_dht`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds for withdrawing our records through the DHT (they expire anyway)
WITHDRAW_TIMEOUT = 10.0
#: seconds for a gRPC server to cancel its calls and stop
SERVER_TIMEOUT = 3.0
#: seconds for hivemind's DHT shutdown (its own 3 s join, then SIGTERM) before the processes are killed
DHT_TIMEOUT = 8.0


def run_within(fn: Callable[[], T], timeout: float, what: str) -> tuple[bool, T | None]:
    """Run ``fn()`` in a daemon thread and wait at most ``timeout`` seconds for it.

    Returns ``(True, its result)``, or ``(False, None)`` past the deadline (logged; the thread
    is left to finish or to end with the process). An exception of ``fn`` is raised here.
    """
    box: dict[str, Any] = {}

    def _target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=_target, name=f"umm-stop: {what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        logger.warning("%s did not finish within %.0f s; going on without it", what, timeout)
        return False, None
    if "error" in box:
        raise box["error"]
    return True, box.get("value")


def withdraw_records(refresher: Any, timeout: float = WITHDRAW_TIMEOUT) -> None:
    """Stop ``refresher`` and withdraw its records within ``timeout`` (those left expire)."""
    run_within(refresher.withdraw_all, timeout, "withdrawing our records")


def stop_server(server: Any, grace: float | None, timeout: float = SERVER_TIMEOUT) -> None:
    """``server.stop(grace)`` (calls still running are cancelled after ``grace``), within ``timeout``."""
    try:
        run_within(lambda: server.stop(grace=grace), timeout, "stopping a gRPC server")
    except Exception as e:
        logger.warning("stopping a gRPC server failed: %s", e)


def leave_dht(dht: Any, pid_file: str | os.PathLike[str] | None, timeout: float = DHT_TIMEOUT) -> None:
    """Shut ``dht`` down within ``timeout``; past it (or on an error), kill its recorded processes."""
    from umm.net.dht import end_orphaned_dht, stop_dht

    t0 = time.monotonic()
    try:
        done, _ = run_within(lambda: stop_dht(dht, pid_file), timeout, "shutting the DHT down")
    except Exception as e:
        logger.warning("shutting the DHT down failed: %s", e)
        done = False
    if not done and pid_file is not None:
        end_orphaned_dht(pid_file)  # SIGKILL, bounded wait
    logger.info("left the DHT in %.1f s", time.monotonic() - t0)
