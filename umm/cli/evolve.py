"""``umm evolve CONFIG.yaml``: layer-wise evolutionary merging (CMA-ES or random search)."""

from __future__ import annotations

from pathlib import Path

import typer

from umm.cli.common import PRIVATE_HELP, PUSH_HELP, push_output, user_errors


def register(app: typer.Typer) -> None:
    """Add ``umm evolve`` to the ``umm`` app."""

    @app.command("evolve")
    def evolve(
        config: Path = typer.Argument(..., help="Evolve config YAML (see examples/evolve.yaml)."),
        resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue the search saved in the run folder."),
        optimizer: str | None = typer.Option(None, "--optimizer", help="cma (default) or random: overrides the config."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu, cuda, cuda:N: overrides the config."),
        run_dir: Path | None = typer.Option(None, "--run-dir", help="Run folder (default: ./runs/evolve-<config>-<optimizer>-seed<seed> under the current directory)."),
        layer_granularity: int | None = typer.Option(None, "--layer-granularity", help="Layers per gene group: overrides the config."),
        suite: str | None = typer.Option(None, "--suite", help="Expert suite variant (full, small) for the config's suite:<variant>/<model> references: overrides the variant they name."),
        set_: list[str] = typer.Option([], "--set", help="KEY=VALUE (YAML value; dotted key for nested: budget.evaluations=9): overrides the config. Repeatable."),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: the usable cores minus the sandbox workers, at least 1)."),
        backend: str | None = typer.Option(None, "--backend", help="loop, hf, vllm or auto: who generates the candidates' completions (vllm: one engine whose weights each candidate replaces in memory): overrides the config."),
        push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO", help=PUSH_HELP),
        private: bool = typer.Option(False, "--private/--no-private", help=PRIVATE_HELP),
        ray: str | None = typer.Option(None, "--ray", help="auto or HOST:PORT of a Ray cluster whose actors score each generation's candidates in parallel (needs the ray extra: pip install 'umm\\[ray]'): overrides the config."),
    ) -> None:
        """Search layer-wise merge coefficients with CMA-ES against the evaluator's search split.

        Models in the config are folders, suite:<variant>/<model> or Hugging Face Hub ids (org/name[@revision]).
        """
        with user_errors():
            _evolve(config, resume, optimizer, device, run_dir, layer_granularity, suite, set_, threads, backend,
                    push_to_hub, private, ray)


def _evolve(config, resume, optimizer, device, run_dir, layer_granularity, suite, sets, threads, backend=None,
            push_to_hub=None, private=False, ray=None) -> None:
    from umm.cli.common import config_overrides, set_threads
    from umm.eval.sandbox import DEFAULT_WORKERS
    from umm.evolve.config import load_config
    from umm.evolve.run import default_run_dir, run_evolve
    from umm.ui import Bars, console

    if push_to_hub is not None:
        from umm.checkpoints.hub import check_repo_id

        check_repo_id(push_to_hub)  # before the suite or the hub models are fetched
    over = config_overrides(config, sets=sets, suite=suite, model_keys=("models", "base_model"))
    over.update({k: v for k, v in (("optimizer", optimizer), ("device", device), ("layer_granularity", layer_granularity),
                                   ("backend", backend), ("ray", ray)) if v is not None})
    cfg = load_config(config, **over)
    if push_to_hub is not None and not cfg.write_model:
        from umm.checkpoints.hub import HubPushError

        raise HubPushError("--push-to-hub needs the merged model: set write_model: true in the config")
    n_threads = set_threads(threads, sandbox_workers=DEFAULT_WORKERS)  # what scoring a code task runs
    out = (run_dir or default_run_dir(config, cfg)).resolve()
    console.print(f"[bold]umm evolve[/]: {cfg.optimizer}, method {cfg.method}, run folder {out}, "
                  f"{n_threads} torch thread(s), backend {cfg.backend}"
                  + (f", candidates on Ray ({cfg.ray})" if cfg.ray else ""), highlight=False)

    def show(state, gen, total) -> None:
        best = state.best()
        n = len(gen.candidates)
        per = sum(c.seconds for c in gen.candidates) / max(1, n)
        apply = sum(c.apply_seconds for c in gen.candidates) / max(1, n)
        console.print(
            f"generation {gen.index}/{total}  best so far {best.fitness:.4f}  "
            f"generation best {gen.best.fitness:.4f}  {per:.2f} s/candidate "
            f"(applying {apply:.3f} s)  evaluations {state.evaluations}",
            highlight=False,
        )

    result = run_evolve(cfg, out, resume=resume, on_generation=show, on_progress=Bars())
    best = result.state.best()
    console.print(f"best fitness (weighted mean score, search split) {best.fitness:.4f} (generation {best.generation}, candidate {best.index})")
    console.print(f"best recipe: {result.best_recipe}")
    if result.model_dir is not None:
        console.print(f"merged model: {result.model_dir}")
        if push_to_hub is not None:
            push_output(result.model_dir, push_to_hub, private, f"umm evolve: {cfg.optimizer} search, {cfg.method}")
    if result.comparison_md:
        console.print("test split comparison:")
        console.print(result.comparison_md, highlight=False, markup=False, soft_wrap=True)
