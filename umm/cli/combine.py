"""``umm combine CONFIG.yaml``: fuse the other families into the pivot, evolve the pivot's family,
publish only an improvement."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from umm.cli.common import PRIVATE_HELP, PUSH_HELP, push_output, user_errors

if TYPE_CHECKING:
    from umm.combine.run import CombineResult, Dropped


def register(app: typer.Typer) -> None:
    """Add ``umm combine`` to the ``umm`` app."""
    app.command("combine")(combine_command)


def combine_command(
    config: Path = typer.Argument(..., help="Combine config YAML (see examples/combine.yaml)."),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder (default: ./runs/combine-<config>-seed<seed> under the current directory)."),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue the run in the run folder: finished stages are read back, a fusion or search in progress continues."),
    device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N: overrides the config."),
    suite: str | None = typer.Option(None, "--suite", help="Expert suite variant (full, small) for the config's suite:<variant>/<model> references: overrides the variant they name."),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE (YAML value; dotted key for nested: evolve.budget.evaluations=9): overrides the config. Repeatable."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: the usable cores minus the sandbox workers, at least 1)."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO", help=PUSH_HELP + " Only a merged "
                                           "model that the decision publishes is pushed."),
    private: bool = typer.Option(False, "--private/--no-private", help=PRIVATE_HELP),
) -> None:
    """Fuse each model of another family into the pivot, merge the pivot's family with CMA-ES,
    compare on the test split, and say whether the merged model beats the best source (and the
    previous merged model) with a paired-bootstrap 95% CI above the margin."""
    with user_errors():
        if push_to_hub is not None:
            from umm.checkpoints.hub import check_repo_id

            check_repo_id(push_to_hub)  # before any work
        result = _combine(config, run_dir, resume, device, suite, set_, threads)
        if push_to_hub is not None:
            if result.decision.published:
                push_output(result.model_dir, push_to_hub, private, f"umm combine: {result.decision.text}"[:500])
            else:
                from umm.ui import console

                console.print(f"[yellow]not pushed to {push_to_hub}[/]: the merged model is no improvement",
                              highlight=False)


def _combine(config: Path, run_dir: Path | None, resume: bool, device: str | None, suite: str | None,
             sets: list[str], threads: int | None) -> CombineResult:
    from umm.cli.common import config_overrides, resolve_instructions_ref, set_threads
    from umm.combine.config import load_config
    from umm.combine.run import default_run_dir, run_combine
    from umm.eval.sandbox import DEFAULT_WORKERS
    from umm.ui import Bars, console

    over = config_overrides(config, sets=sets, suite=suite, model_keys=("models", "base_model", "pivot", "previous"))
    over.update({k: v for k, v in (("device", device),) if v is not None})
    cfg = load_config(config, **over)
    data = cfg.fusion.data
    if data is not None and str(data).startswith("instructions:"):  # a nested data reference
        cfg = cfg.model_copy(update={"fusion": cfg.fusion.model_copy(update={"data": Path(resolve_instructions_ref(str(data)))})})
    n_threads = set_threads(threads, sandbox_workers=DEFAULT_WORKERS)
    out = (run_dir or default_run_dir(config, cfg)).resolve()
    console.print(f"[bold]umm combine[/]: {len(cfg.models)} models, run folder {out}, {n_threads} torch thread(s)",
                  highlight=False)
    return run_combine(cfg, out, resume=resume, events=ConsoleCombineEvents(), on_progress=Bars())


class ConsoleCombineEvents:
    """``umm combine``'s view of a run (a :class:`umm.combine.run.CombineEvents`): bold stage
    titles, yellow warnings, the comparison table and the decision in a panel."""

    def __init__(self) -> None:
        from umm.ui import console

        self.console = console

    def stage(self, name: str, detail: str) -> None:
        from umm.combine.run import STAGES

        number = f"{STAGES.index(name) + 1}/{len(STAGES)} " if name in STAGES else ""
        self.console.print(f"[bold]{number}{name}[/]" + (f" ({detail})" if detail else ""), highlight=False)

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def warning(self, text: str) -> None:
        self.console.print(f"[yellow]{text}[/]", highlight=False)

    def dropped(self, dropped: Dropped) -> None:
        self.console.print(f"[yellow]dropped {dropped.source}: {dropped.reason}[/]", highlight=False)

    def result(self, result: CombineResult) -> None:
        self.console.print(comparison_table(result))
        colour = "green" if result.decision.published else "yellow"
        self.console.print(f"[bold {colour}]{result.decision.text}[/]", highlight=False)
        self.console.print(f"merged model: {result.model_dir} (card: {result.model_dir / 'README.md'}); "
                           f"summary: {result.run_dir / 'combine.json'}", highlight=False)


def comparison_table(result: CombineResult) -> Any:
    """The test table: one row per model, ``score [95% CI]`` per task, and the objective."""
    from umm.ui import table

    comparison = result.comparison
    tasks = list(comparison.weights)
    rows = [[r.name, r.kind, *(f"{r.scores[t]:.3f} [{r.ci[t][0]:.2f}, {r.ci[t][1]:.2f}] n={r.n[t]}" for t in tasks),
             f"{r.objective:.3f}"] for r in comparison.rows]
    return table("test split: merged vs every input model (95% CI)", ["model", "kind", *tasks, "objective"], rows)
