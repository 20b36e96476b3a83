"""Pieces shared by every command module of the ``umm`` app."""

from __future__ import annotations

import contextlib
import gc
import signal
from collections.abc import Iterator

import typer


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`umm.errors.UmmError` into a one-line ``error:`` message and exit code 2.

    ``umm.cli.run_app`` does the same for the console scripts; commands wrap their body in this too
    so the behaviour holds when the typer app is invoked directly (``typer.testing.CliRunner``).
    """
    from umm.errors import UmmError
    from umm.ui import err_console

    try:
        yield
    except UmmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread, so whatever Ctrl-C cleans up is cleaned up."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises :class:`Terminated` (a ``KeyboardInterrupt``) in the main thread.

    A ``kill PID`` then takes the Ctrl-C path: ``with`` blocks and ``finally`` clauses run, so e.g.
    a merge removes its hidden partial output folder. Only the first SIGTERM raises; later ones
    are ignored, so they cannot cut that clean-up short (SIGKILL still ends the process). Yields
    a list that holds the signal number once one arrived. Main thread only (Python's rule).
    """
    received: list[int] = []

    def _handler(signum: int, _frame: object) -> None:
        if not received:
            received.append(signum)
            raise Terminated()

    previous = signal.signal(signal.SIGTERM, _handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def freeze_for_exit() -> None:
    """Let the interpreter end without the cyclic collector's passes over every object.

    Python collects garbage while it tears down its modules; with torch, transformers, hivemind and
    grpc imported (a node, a coordinator) those passes dominate the exit: 2.6-3.6 s measured under
    a load average of ~12 on 2 cores (0.56 s after ``gc.freeze``), and their cost grows with the
    load, so a stopped node took seconds to tens of seconds more to end. Call it once the
    command's own clean-up is done; the objects it freezes are only ever collected at exit.
    """
    gc.freeze()
