"""``umm fuse CONFIG.yaml``: distribution fusion of heterogeneous models into a pivot."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from umm.cli.common import user_errors




def register(app: typer.Typer) -> None:
    """Add ``umm fuse`` to the ``umm`` app."""
    app.command("fuse")(fuse_command)


def fuse_command(
    config: Path = typer.Argument(..., help="Fuse config YAML (see examples/fuse.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (teacher passes and training resume; a finished output is only re-evaluated)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N: overrides the config."),
    output: Optional[Path] = typer.Option(None, "--output", help="Folder of the fused model: overrides the config."),
) -> None:
    """Fuse the sources' token distributions into the pivot, then compare on the test split.

    Stages: check inputs, choose the pivot (best on the hardest domain, search split) unless the
    config names one, teacher passes (cached; storage per token printed), training, final table.
    """
    with user_errors():
        from umm.fusion.pipeline import load_config, run_fuse
        from umm.ui import console

        cfg = load_config(config, device=device, output=output)
        console.print(f"[bold]umm fuse[/]: {cfg.fusion}, k={cfg.k}, lambda={cfg.lam}, output {cfg.output}")
        result = run_fuse(cfg, resume=resume)
        console.print(f"pivot {result.pivot}; fused model in {result.output} "
                      f"(report: {result.output / 'fuse_report.json'})", highlight=False)
