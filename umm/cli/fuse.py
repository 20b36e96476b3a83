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
    suite: Optional[str] = typer.Option(None, "--suite", help="Expert suite variant (full, small) for the config's suite:<variant>/<model> references: overrides the variant they name."),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE (YAML value; dotted key for nested: training.max_steps=2): overrides the config. Repeatable."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: the usable cores minus the sandbox workers, at least 1)."),
) -> None:
    """Fuse the sources' token distributions into the pivot, then compare on the test split.

    Stages: check inputs, choose the pivot (best on the hardest domain, search split) unless the
    config names one, teacher passes (cached; storage per token printed), training, final table.
    """
    with user_errors():
        from umm.cli.common import config_overrides, set_threads
        from umm.fusion.pipeline import load_config, run_fuse
        from umm.ui import console

        over = config_overrides(config, sets=set_, suite=suite, model_keys=("pivot", "sources"), data_keys=("data",))
        over.update({k: v for k, v in (("device", device), ("output", output)) if v is not None})
        cfg = load_config(config, **over)
        n_threads = set_threads(threads, sandbox_workers=cfg.eval.sandbox_workers)
        console.print(f"[bold]umm fuse[/]: {cfg.fusion}, k={cfg.k}, lambda={cfg.lam}, output {cfg.output}, "
                      f"{n_threads} torch thread(s)", highlight=False)
        result = run_fuse(cfg, resume=resume)
        console.print(f"pivot {result.pivot}; fused model in {result.output} "
                      f"(report: {result.output / 'fuse_report.json'})", highlight=False)
