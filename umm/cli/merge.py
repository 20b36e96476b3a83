"""``umm merge``: (being built; see the module's owner issue)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the ``umm`` app."""
