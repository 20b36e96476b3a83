"""Pieces shared by every command module of the ``umm`` app."""

from __future__ import annotations

import contextlib
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
