"""``umm-coordinator``: the coordinator's command line."""

from __future__ import annotations

import typer

from umm.cli import run_app

app = typer.Typer(
    name="umm-coordinator",
    help=(
        "Run a umm network's coordinator: discover experts on the DHT, re-evaluate and rank them, "
        "merge the best and publish the result. "
        "The network commands (init, run, status) arrive with the network milestone."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def _root() -> None:
    pass


def main(argv: list[str] | None = None) -> None:
    run_app(app, argv)
