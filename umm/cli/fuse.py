"""``umm fuse CONFIG.yaml``: distribution fusion of heterogeneous models into a pivot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from umm.cli.common import PRIVATE_HELP, PUSH_HELP, push_output, user_errors

if TYPE_CHECKING:
    from umm.fusion.pipeline import FuseConfig, FuseResult, Stage, TeacherInfo
    from umm.training import StepReport


def register(app: typer.Typer) -> None:
    """Add ``umm fuse`` to the ``umm`` app."""
    app.command("fuse")(fuse_command)


def fuse_command(
    config: Path = typer.Argument(..., help="Fuse config YAML (see examples/fuse.yaml)."),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue an interrupted run (teacher passes and training resume; a finished output is only re-evaluated)."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N: overrides the config."),
    output: Path | None = typer.Option(None, "--output", help="Folder of the fused model: overrides the config."),
    suite: str | None = typer.Option(None, "--suite", help="Expert suite variant (full, small) for the config's suite:<variant>/<model> references: overrides the variant they name."),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE (YAML value; dotted key for nested: training.max_steps=2): overrides the config. Repeatable."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: the usable cores minus the sandbox workers, at least 1)."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO", help=PUSH_HELP),
    private: bool = typer.Option(False, "--private/--no-private", help=PRIVATE_HELP),
) -> None:
    """Fuse the sources' token distributions into the pivot, then compare on the test split.

    Stages: check inputs, choose the pivot (best on the hardest domain, search split) unless the
    config names one, teacher passes (cached; storage per token printed), training, final table.
    Models in the config are folders, suite:<variant>/<model> or Hugging Face Hub ids (org/name[@revision]).
    """
    with user_errors():
        from umm.cli.common import config_overrides, set_threads
        from umm.fusion.pipeline import load_config, run_fuse
        from umm.ui import Bars, console

        if push_to_hub is not None:
            from umm.checkpoints.hub import check_repo_id

            check_repo_id(push_to_hub)
        over = config_overrides(config, sets=set_, suite=suite, model_keys=("pivot", "sources"), data_keys=("data",))
        over.update({k: v for k, v in (("device", device), ("output", output)) if v is not None})
        cfg = load_config(config, **over)
        n_threads = set_threads(threads, sandbox_workers=cfg.eval.sandbox_workers)
        console.print(f"[bold]umm fuse[/]: {cfg.fusion}, k={cfg.k}, lambda={cfg.lam}, output {cfg.output}, "
                      f"{n_threads} torch thread(s)", highlight=False)
        events = ConsoleFuseEvents()
        try:
            result = run_fuse(cfg, resume=resume, events=events, on_progress=Bars())
        finally:
            events.steps.close()
        console.print(f"pivot {result.pivot}; fused model in {result.output} "
                      f"(report: {result.output / 'fuse_report.json'})", highlight=False)
        if push_to_hub is not None:
            push_output(result.output, push_to_hub, private, f"umm fuse: {cfg.fusion} into {Path(result.pivot).name}")


class ConsoleFuseEvents:
    """``umm fuse``'s view of a run (a :class:`umm.fusion.pipeline.FuseEvents`): bold stage titles,
    tables, yellow warnings, a training progress bar."""

    def __init__(self) -> None:
        from umm.ui import StepBars, console

        self.console = console
        self.steps = StepBars()

    def stage(self, stage: Stage) -> None:
        detail = f" ({stage.detail})" if stage.detail else ""
        self.console.print(f"[bold]{stage.number}/{stage.total} {stage.title}[/]{detail}")

    def note(self, text: str) -> None:
        self.console.print(text)

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/]")

    def candidates_scored(self, scores: dict[str, dict[str, float]], pivot: Path, domain: str) -> None:
        from umm.ui import table

        doms = sorted({d for s in scores.values() for d in s})
        rows = [[Path(m).name + (" (pivot)" if m == str(pivot) else ""), *(f"{s.get(d, float('nan')):.3f}" for d in doms)]
                for m, s in scores.items()]
        self.console.print(table(f"candidates on the search split (pivot: best on {domain})", ["model", *doms], rows))

    def teacher_passes(self, teachers: Sequence[TeacherInfo], cfg: FuseConfig) -> None:
        from umm.ui import human_bytes, table

        self.console.print(table(
            f"teacher passes (top-{cfg.k}, max length {cfg.max_length}, layout {cfg.layout})",
            ["model", "layout", "response tokens", "on disk", "bytes/token", "dense fp16 bytes/token", "truncated", "dropped"],
            [[t.name, t.layout, t.n_tokens, human_bytes(t.storage_bytes), f"{t.bytes_per_token:.1f}",
              t.dense_bytes_per_token, t.n_truncated, t.n_dropped] for t in teachers]))

    def training_step(self, report: StepReport) -> None:
        self.steps(report)

    def results(self, result: FuseResult, tasks: Sequence[str]) -> None:
        self.console.print(results_table(result, tasks))


def results_table(result: FuseResult, tasks: Sequence[str], split: str = "test") -> Any:
    """The final table: one row per model, one column per task, ``score [95% CI]`` on ``split``."""
    from umm.fusion.pipeline import task_domains
    from umm.ui import table

    domains = task_domains(tasks)
    cols = ["model", "role", *(f"{t} ({domains[t]})" for t in tasks)]
    rows = []
    for m in result.test:
        cells = []
        for t in tasks:
            s, lo, hi, n = m.scores[t]
            cells.append(f"{s:.3f} [{lo:.2f}, {hi:.2f}] n={n}")
        rows.append([m.name, m.role, *cells])
    return table(f"{split} split: pivot before vs fused vs sources (95% CI)", cols, rows)
