"""``umm demo``: the tiny expert suite (built once, then cached) + a whole umm network on 127.0.0.1.

Step 1 prepares the ``full`` tiny expert suite (:func:`umm.experts.build.ensure_suite`: a Llama
base, math and code experts fine-tuned from it, a GPT-NeoX list expert with its own tokenizer;
a few minutes on 2 CPU cores the first time, reused afterwards). Step 2 is ``umm net local``
with the demo's defaults: node processes serve the experts over the DHT and gRPC, a coordinator
ranks them with its own evaluation, merges the best of each domain, compares the merged model
with its sources on the ``test`` split, and every node downloads and verifies it. Exit code 1
if any check failed (as ``umm net local``).
"""

from __future__ import annotations

import time
from pathlib import Path

import typer

from umm.cli.net import SUMMARY_HELP, default, describe
from umm.net.local import LocalNetConfig

# Three nodes: two model families, so the round runs both stages: the GPT-NeoX list expert is fused
# into the pivot's (Llama) family, then CMA-ES merges the math and code experts, the fused model and
# the pivot onto the shared base. 64 test items per task, so the publish decision's interval means
# something. Fusion data: 1000 records per domain, 2 epochs (as bench/demo_fusion.py).
DEMO_VARIANT = "full"
DEMO_NODES = 3
DEMO_ROUNDS = 1
DEMO_EVAL_LIMIT = 32
DEMO_TEST_LIMIT = 64
DEMO_EVOLVE_EVALUATIONS = 25
DEMO_EVOLVE_POPULATION = 8
DEMO_FUSION_RECORDS = 1000
DEMO_FUSION_EPOCHS = 2


def register(app: typer.Typer) -> None:
    """Add ``umm demo`` to the ``umm`` app."""
    app.command("demo")(demo_command)


def demo_command(
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Folder for the network's processes, data and logs, cleared at the start "
        "(default: <umm home>/demo)."
    ),
    variant: str = typer.Option(DEMO_VARIANT, "--variant", help="Tiny expert suite: full (the demo) or small (seconds, "
                                "scores near zero: for tests)."),
    nodes: int = typer.Option(DEMO_NODES, "--nodes", help="Node processes; node i serves the expert of math, code, "
                              "list (i mod 3)."),
    rounds: int = typer.Option(DEMO_ROUNDS, "--rounds", help="Coordinator rounds."),
    eval_limit: int = typer.Option(DEMO_EVAL_LIMIT, "--eval-limit", help="Items per task when ranking experts and "
                                   "searching merges (search split)."),
    test_limit: int = typer.Option(DEMO_TEST_LIMIT, "--test-limit", help="Items per task when comparing the merged "
                                   "model with its sources (test split)."),
    max_new_tokens: int | None = typer.Option(default("max_new_tokens"), "--max-new-tokens", help=describe("max_new_tokens")),
    evolve_evaluations: int = typer.Option(DEMO_EVOLVE_EVALUATIONS, "--evolve-evaluations",
                                           help=describe("evolve_evaluations")),
    fusion_records: int = typer.Option(DEMO_FUSION_RECORDS, "--fusion-records", help=describe("fusion_records")),
    margin: float = typer.Option(default("margin"), "--margin", help=describe("margin")),
    experts_dir: Path | None = typer.Option(None, "--experts-dir", help="Where the expert suites live "
                                               "(default: <umm home>/experts)."),
    summary_json: Path | None = typer.Option(None, "--summary-json", help=SUMMARY_HELP),
    dashboard: str | None = typer.Option(default("dashboard"), "--dashboard", metavar="HOST:PORT",
                                         help=describe("dashboard")),
    linger: bool = typer.Option(default("linger"), "--linger/--no-linger", help=describe("linger")),
) -> None:
    """Prepare the tiny experts (cached) and run a local umm network on them: ``umm net local`` with
    the demo's defaults. Prints the leaderboard, the merged model beside its sources, and where
    everything is."""
    from umm import paths
    from umm.cli.common import user_errors
    from umm.net.local import LocalNetConfig

    with user_errors():
        cfg = LocalNetConfig(
            workdir=(workdir if workdir is not None else paths.home() / "demo").expanduser().absolute(), nodes=nodes,
            rounds=rounds, variant=variant, experts_root=experts_dir, eval_limit=eval_limit, test_limit=test_limit,
            max_new_tokens=max_new_tokens, evolve_evaluations=evolve_evaluations,
            evolve_population=max(2, min(DEMO_EVOLVE_POPULATION, evolve_evaluations - 1)),
            fusion_records=fusion_records, fusion_epochs=DEMO_FUSION_EPOCHS, fusion_max_steps=None, margin=margin,
            dashboard=dashboard, linger=linger,
        )  # checks the options before anything is built
        code = _demo(cfg, summary_json)
    if code:
        raise typer.Exit(code)


def _demo(cfg: LocalNetConfig, summary_json: Path | None) -> int:
    from umm.cli.net import run_and_report
    from umm.experts.build import SuiteNotBuiltError, ensure_suite, is_current, load_suite
    from umm.experts.recipes import get_recipe
    from umm.ui import Bars, console

    t_start = time.monotonic()
    variant, experts_dir, nodes, rounds = cfg.variant, cfg.experts_root, cfg.nodes, cfg.rounds
    try:
        cached = is_current(load_suite(variant, experts_dir), get_recipe(variant))
    except SuiteNotBuiltError:
        cached = False
    console.print(f"[bold]1/2[/] expert suite {variant!r}: "
                  f"{'cached' if cached else 'building it (once; a few minutes on 2 CPU cores)'} ...", highlight=False)
    t0 = time.monotonic()
    suite = ensure_suite(variant, experts_dir, on_progress=Bars())
    t_suite = time.monotonic() - t0
    console.print(f"    {', '.join(suite.models)} in {suite.root} ({'cached' if cached else f'built in {t_suite:.0f} s'})",
                  highlight=False)
    console.print(f"[bold]2/2[/] local network: {nodes} node(s), a coordinator, {rounds} round(s) in {cfg.workdir}",
                  highlight=False)
    t1 = time.monotonic()
    code, result = run_and_report(cfg, suite, summary_json=summary_json)
    t_net = time.monotonic() - t1

    merged = result.merged_hash
    holder = next((n for n in result.nodes if n.holds_merged), None)
    rows = [
        ("expert suite", f"{suite.root} ({'cached' if cached else f'built in {t_suite:.0f} s'})"),
        ("network", f"{nodes} node process(es) + a coordinator on 127.0.0.1, {rounds} round(s), "
                    f"{cfg.eval_limit} search / {cfg.test_limit} test items per task; {t_net:.0f} s"),
        ("merged model", str(holder.data_dir / "models" / merged) if holder and merged else "none"),
        ("nodes holding it (verified)", f"{sum(n.holds_merged for n in result.nodes)} of {len(result.nodes)}"),
        *([("dashboard (while it ran)", result.dashboard_url)] if result.dashboard_url else []),
        ("coordinator state", str(cfg.workdir / "coordinator" / "data" / "state.db")),
        ("logs of every process", str(cfg.workdir / "logs")),
    ]
    console.print(f"[bold]umm demo: {'done' if code == 0 else 'FAILED'}[/] in {time.monotonic() - t_start:.0f} s",
                  highlight=False)
    for label, value in rows:  # plain lines, not a table: paths stay whole in a narrow terminal
        console.print(f"  {label + ':':<29} {value}", highlight=False, soft_wrap=True)
    console.print("Next: `umm net local --help` (more nodes, rounds, items); `umm eval --help` to score the merged "
                  "model; `umm-node join` / `umm-coordinator run` for a real network (README).", highlight=False)
    return code
