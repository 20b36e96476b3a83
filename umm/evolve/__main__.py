"""``python -m umm.evolve CONFIG.yaml [options]``: the ``umm evolve`` command on its own."""

from __future__ import annotations

import typer

from umm.cli import run_app
from umm.cli.evolve import register


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    run_app(app, argv)


if __name__ == "__main__":
    main()
