"""How library code reports progress: a callback shape, no drawing.

A long-running library function takes ``on_progress: ProgressSink | None = None``. For each
stretch of work it calls ``on_progress.start(total, desc, unit)`` and advances the returned
:class:`ProgressBar` as work completes; ``None`` means silent. The library never creates a
terminal bar itself: the applications pass :class:`umm.ui.Bars` (tqdm on stderr), tests and
workers pass nothing (or a recorder).

Library code uses :func:`open_bar` and :func:`track`, which also handle ``None``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class ProgressBar(Protocol):
    """One stretch of work being reported: ``advance`` by ``n`` units (``info``: short labelled
    values shown beside the count, e.g. ``best="0.4125"``), then ``close`` once."""

    def advance(self, n: float = 1, **info: str) -> None: ...

    def close(self) -> None: ...


class ProgressSink(Protocol):
    """Where progress goes: ``start`` a bar of ``total`` ``unit`` (``None``: unknown; ``"B"``:
    bytes), labelled ``desc``. Several bars may be open at once (nested work)."""

    def start(self, total: float | None, desc: str, unit: str) -> ProgressBar: ...


class _Silent:
    def advance(self, n: float = 1, **info: str) -> None:
        pass

    def close(self) -> None:
        pass


SILENT: ProgressBar = _Silent()


def open_bar(sink: ProgressSink | None, total: float | None, desc: str, unit: str) -> ProgressBar:
    """``sink.start(...)``, or a bar that shows nothing when ``sink`` is ``None``."""
    return SILENT if sink is None else sink.start(total, desc, unit)


def track(items: Sequence[T], sink: ProgressSink | None, desc: str, unit: str) -> Iterator[T]:
    """Yield ``items``, advancing a bar of ``len(items)`` after each; the bar closes when the
    loop ends (or the generator is closed)."""
    bar = open_bar(sink, len(items), desc, unit)
    try:
        for item in items:
            yield item
            bar.advance(1)
    finally:
        bar.close()
