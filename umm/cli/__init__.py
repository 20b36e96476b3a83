"""The ``umm`` command line: one typer app, one module per command group.

Each ``umm/cli/<name>.py`` module defines ``register(app)`` and imports heavy libraries (torch,
transformers, hivemind) inside its command functions, so ``umm --help`` stays fast.
:class:`umm.errors.UmmError` raised anywhere becomes a one-line error and exit code 2.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer

from umm.errors import UmmError
from umm.speedups import fast_exit
from umm.ui import err_console, setup_logging

app = typer.Typer(
    name="umm",
    help="Unconstrained model merging: merge, evolve, fuse and evaluate LLM experts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags shown as --x/--no-x, never with a <bool> metavar
)


@app.callback()
def _root(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v for INFO logs, -vv for DEBUG."),
) -> None:
    setup_logging(verbose)


def _register_all() -> None:
    from umm.cli import combine, demo, eval, evolve, experts, fuse, merge, net

    for module in (merge, evolve, fuse, combine, eval, experts, net, demo):
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
    """Entry point of the ``umm`` console script: :func:`main`, then :func:`umm.speedups.fast_exit`.

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
    fast_exit(code)
