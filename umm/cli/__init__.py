"""The ``umm`` command line: one typer app, one module per command group.

Each ``umm/cli/<name>.py`` module defines ``register(app)`` and imports heavy libraries (torch,
transformers, hivemind) inside its command functions, so ``umm --help`` stays fast.
:class:`umm.errors.UmmError` raised anywhere becomes a one-line error and exit code 2.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn

import typer

from umm.errors import UmmError
from umm.ui import err_console, setup_logging

app = typer.Typer(
    name="umm",
    help="Unconstrained model merging: merge, evolve, fuse and evaluate LLM experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v for INFO logs, -vv for DEBUG."),
) -> None:
    setup_logging(verbose)


def _register_all() -> None:
    from umm.cli import demo, eval, evolve, experts, fuse, merge, net

    for module in (merge, evolve, fuse, eval, experts, net, demo):
        module.register(app)


_register_all()


def run_app(typer_app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app, turning :class:`UmmError` into a clean message and exit code 2."""
    try:
        typer_app(args=argv, standalone_mode=True)
    except UmmError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)


def console_main() -> NoReturn:
    """Entry point of the ``umm`` console script: :func:`main`, then :func:`exit_quickly`.

    SIGTERM is handled as Ctrl-C (:func:`umm.cli.common.sigterm_as_interrupt`: partial outputs
    are removed); the exit status is then 143 (128 + SIGTERM), as a shell reports a killed job.
    """
    from umm.cli.common import sigterm_as_interrupt

    with sigterm_as_interrupt() as received:
        try:
            main()
            code: int | str | None = 0
        except SystemExit as exc:
            code = exc.code
    if received:
        code = 128 + received[0]
    exit_quickly(code)


def exit_quickly(code: int | str | None) -> NoReturn:
    """End the process as ``sys.exit(code)`` would, without tearing down the interpreter.

    Once torch is imported, Python's own teardown (destroying every module and the objects
    they hold) takes 0.1-0.2 s, as long as a small merge's disk writes. Everything a program
    may rely on at exit still happens: ``atexit`` handlers run (logging's flush,
    multiprocessing's and temporary folders' clean-up) and stdout/stderr are flushed. Falls back
    to ``sys.exit`` while a non-daemon thread runs (Python would wait for it). Not for use
    inside a process that goes on running code (tests, notebooks).
    """
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message") prints the message and exits with 1
        print(code, file=sys.stderr)
        status = 1
    try:
        atexit._run_exitfuncs()  # logging registers its flush here too
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status & 0xFF)
