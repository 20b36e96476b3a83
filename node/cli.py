"""``umm-node``: the contributor's command line."""

from __future__ import annotations

import typer

from umm.cli import run_app

app = typer.Typer(
    name="umm-node",
    help=(
        "Contribute an expert checkpoint to a umm network: announce it on the DHT, serve it over "
        "gRPC, and fetch the merged models the coordinator publishes. "
        "The network commands (join, status) arrive with the network milestone."
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
