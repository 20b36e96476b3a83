"""``umm experts``: build (``prepare``) and list the tiny trained expert suite."""

from __future__ import annotations

from pathlib import Path

import typer

from umm.cli.common import user_errors

experts_app = typer.Typer(help="The tiny trained expert suite (base, math, code, list) for demos and tests.", no_args_is_help=True)




def register(app: typer.Typer) -> None:
    """Add ``umm experts prepare`` and ``umm experts list`` to the ``umm`` app."""
    app.add_typer(experts_app, name="experts")


def _models_table(suite) -> object:
    from umm.ui import table

    rows = [
        (
            name,
            m["family"],
            m["tokenizer"],
            f"{m['params']:,}",
            ", ".join(m["domains"]) or "-",
            m["base"] or "-",
            m["steps"],
            f"{m['final_loss']:.3f}",
            f"{m['train_seconds']:.1f}",
        )
        for name, m in suite.models.items()
    ]
    cols = ["model", "family", "tokenizer", "params", "domains", "from", "steps", "loss", "train s"]
    return table(f"expert suite {suite.variant} ({suite.root})", cols, rows)


@experts_app.command("prepare")
def prepare(
    variant: str = typer.Option("full", "--variant", help="full (the demo suite, ~10 min on 2 cores) or small (tests, < 1 min)."),
    directory: Path | None = typer.Option(None, "--dir", help="Parent folder of the suite (default: umm's experts cache)."),
    force: bool = typer.Option(False, "--force/--no-force", help="Rebuild even if a suite from the same recipe is cached."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda:N)."),
    stage: str | None = typer.Option(
        None, "--stage", help="Train only this model (e.g. base) and save it as the prebuilt folder its recipe names "
        "(umm/experts/prebuilt/; commit it), or into --out.",
    ),
    out: Path | None = typer.Option(None, "--out", help="With --stage: write the prebuilt folder here instead."),
) -> None:
    """Train the tokenizers and models of a suite variant (cached: reused when up to date)."""
    with user_errors():
        from umm.errors import UmmError
        from umm.experts.build import build_stage, ensure_suite, load_suite, suite_dir
        from umm.experts.recipes import get_recipe
        from umm.ui import Bars, StepBars, console

        if device != "cpu" and not device.startswith("cuda"):
            raise UmmError(f"unknown --device {device!r}; valid: cpu, cuda, cuda:N")
        recipe = get_recipe(variant)
        if stage is not None:
            console.print(f"training [bold]{stage}[/] of suite {variant} alone (a prebuilt stage)")
            folder = build_stage(recipe, stage, out, device=device, on_step=StepBars(leave=False))
            console.print(f"wrote {folder} (sha256 of each file and the recipe fingerprint in prebuilt.json)")
            return
        if out is not None:
            raise UmmError("--out goes with --stage")
        target = suite_dir(variant, directory)
        try:
            cached = not force and load_suite(variant, directory).info["recipe_fingerprint"] == recipe.fingerprint()
        except UmmError:
            cached = False
        if not cached:
            console.print(f"building expert suite [bold]{variant}[/] in {target} ({recipe.description})")
        suite = ensure_suite(recipe, directory, force=force, device=device, on_step=StepBars(leave=False),
                             on_progress=Bars())
        console.print(_models_table(suite))
        how = "cached, up to date" if cached else f"built in {suite.info['build_seconds']:.0f}s"
        console.print(f"{variant}: {how}; description in {suite.root / 'suite.json'}")


@experts_app.command("list")
def list_suites(
    directory: Path | None = typer.Option(None, "--dir", help="Parent folder of the suites (default: umm's experts cache)."),
) -> None:
    """Show the variants (built or not) and the models of each built one."""
    with user_errors():
        from umm.errors import UmmError
        from umm.experts.build import is_current, load_suite, suite_dir
        from umm.experts.recipes import RECIPES
        from umm.ui import console

        for variant, recipe in RECIPES.items():
            try:
                suite = load_suite(variant, directory)
            except UmmError:
                console.print(f"{variant}: not built ({suite_dir(variant, directory)}); `umm experts prepare --variant {variant}`")
                continue
            state = "up to date" if is_current(suite, recipe) else "stale (recipe changed; prepare rebuilds it)"
            console.print(f"{variant}: {state}, built {suite.info['created']}")
            console.print(_models_table(suite))
