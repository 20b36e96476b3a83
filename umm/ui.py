"""Terminal output shared by the applications (``umm``, ``umm-node``, the coordinator): logging
set-up, progress bars and tables.

This is presentation, not library: library code logs with :mod:`logging` and reports progress and
stages through callbacks (:class:`umm.progress.ProgressSink`, :data:`umm.training.OnStep`,
:class:`umm.fusion.pipeline.FuseEvents`) that the applications render with this module
(:class:`Bars`, :class:`StepBars`, :data:`console`). Progress bars
go to stderr and switch themselves off when stderr is not a terminal or ``UMM_NO_PROGRESS=1`` is
set, so logs and CI output stay clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from umm.progress import ProgressSink
    from umm.training import StepReport

T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


def setup_logging(verbose: int = 0) -> None:
    """Configure the root logger once: WARNING by default, INFO with -v, DEBUG with -vv."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("hivemind", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def progress_enabled() -> bool:
    if os.environ.get("UMM_NO_PROGRESS") == "1":
        return False
    return sys.stderr.isatty()


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    leave: bool = True,
    disable: bool | None = None,
) -> Any:
    """A tqdm progress bar on stderr; off when stderr is not a TTY (see module docstring)."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        leave=leave,
        disable=(not progress_enabled()) if disable is None else disable,
        file=sys.stderr,
        dynamic_ncols=True,
    )


class Bars:
    """A :class:`umm.progress.ProgressSink` drawing one tqdm bar per :meth:`start` (bytes for unit
    ``"B"``, scaled); ``leave`` keeps finished bars on screen."""

    def __init__(self, *, leave: bool = True) -> None:
        self.leave = leave

    def start(self, total: float | None, desc: str, unit: str) -> _Bar:
        return _Bar(progress(total=total, desc=desc, unit=unit, unit_scale=unit == "B", leave=self.leave))


def progress_sink(on_progress: ProgressSink | None, show_progress: bool) -> ProgressSink | None:
    """``on_progress``, else :class:`Bars` when ``show_progress``: the shorthand that a few widely
    called library functions keep (``evaluate(..., show_progress=True)``); silent by default."""
    if on_progress is not None:
        return on_progress
    return Bars() if show_progress else None


class _Bar:
    """A :class:`umm.progress.ProgressBar` over one tqdm bar."""

    def __init__(self, bar: Any) -> None:
        self._bar = bar

    def advance(self, n: float = 1, **info: str) -> None:
        if info:
            self._bar.set_postfix(info, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class StepBars:
    """An :data:`umm.training.OnStep` callback: one progress bar per training run, with its loss.

    A bar opens at a run's first report (a resumed run's bar starts where it resumed) and closes at
    its last step; ``leave`` keeps finished bars on screen.
    """

    def __init__(self, *, leave: bool = True) -> None:
        self.leave = leave
        self._run: str | None = None
        self._bar: Any = None

    def __call__(self, report: StepReport) -> None:
        if self._bar is None or report.run != self._run:
            self.close()
            self._run = report.run
            self._bar = progress(total=report.total, desc=report.run, unit="step", leave=self.leave)
            self._bar.update(report.step - 1)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{report.loss:.4f}")
        if report.step >= report.total:
            self.close()

    def close(self) -> None:
        """Close the open bar, if any (a run that stopped before its last step)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def transformers_bars_off() -> Iterator[None]:
    """Hide transformers' own progress bars (``save_pretrained``'s "Writing model shards") within
    a step that shows its own progress; restores the previous setting."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A rich table with the given columns; cells are rendered with ``str``."""
    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*("" if c is None else str(c) for c in row))
    return t


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
