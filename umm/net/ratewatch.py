"""Cut network streams that fall below a minimum rate (client downloads and server sends alike).

A peer that never goes silent for a whole timeout, but sends (or reads) one byte now and then,
would otherwise hold a stream, a thread and a download slot for ever. :class:`RateWatchdog` judges
every watched stream over windows of ``timeout`` seconds and cancels the ones that stall or crawl.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from umm.ui import human_bytes

logger = logging.getLogger(__name__)


class Cancellable(Protocol):
    """A gRPC client call or server context: anything with ``cancel()``."""

    def cancel(self) -> object: ...


class RateWatchdog:
    """Cancels streaming calls that fall below a minimum rate, and says why.

    Each call is judged over windows of ``timeout`` seconds: a window without a byte is a stall;
    one with fewer than ``min(min_rate * timeout, bytes still expected)`` bytes is too slow. So a
    provider that trickles a byte now and then (never silent for ``timeout``) is cut all the same.
    """

    def __init__(self, timeout: float, min_rate: float, *, name: str = "umm-rate-watchdog"):
        self.timeout = timeout
        self.min_rate = min_rate
        self._calls: dict[int, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, call: Cancellable, expected: int) -> None:
        with self._lock:
            self._calls[id(call)] = _Watched(call, expected, time.monotonic())

    def got(self, call: Cancellable, n: int) -> None:
        with self._lock:
            w = self._calls.get(id(call))
            if w is not None:
                w.window_bytes += n
                w.expected -= n

    def forget(self, call: Cancellable) -> str | None:
        """Stop watching ``call``; why it was cancelled by the watchdog, if it was."""
        with self._lock:
            w = self._calls.pop(id(call), None)
        return w.reason if w is not None else None

    def cancel_all(self) -> None:
        with self._lock:
            calls = [w.call for w in self._calls.values()]
        for call in calls:
            call.cancel()

    def _judge(self, w: _Watched, now: float) -> str | None:
        """Why ``w`` must be cancelled now (None: not yet); starts its next window when it passes."""
        if now - w.window_start < self.timeout:
            return None
        if w.window_bytes == 0:
            return f"stalled: no data for {self.timeout:.0f} s"
        need = min(self.min_rate * self.timeout, w.window_expected)
        if w.window_bytes < need:
            return (f"too slow: {w.window_bytes} bytes in {now - w.window_start:.0f} s, under the minimum of "
                    f"{human_bytes(self.min_rate)}/s")
        w.window_start, w.window_bytes, w.window_expected = now, 0, w.expected
        return None

    def _run(self) -> None:
        period = min(1.0, self.timeout / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                doomed = []
                for w in self._calls.values():
                    if w.reason is None and (why := self._judge(w, now)) is not None:
                        w.reason = why
                        doomed.append(w)
            for w in doomed:
                logger.info("cancelling a stream: %s", w.reason)
                w.call.cancel()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Watched:
    call: Cancellable
    expected: int  # bytes still to come
    window_start: float
    window_bytes: int = 0
    window_expected: int = -1  # bytes expected when the window started
    reason: str | None = None

    def __post_init__(self) -> None:
        self.window_expected = self.expected
