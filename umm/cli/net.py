"""``umm net local``: run a coordinator and N nodes on 127.0.0.1 with the tiny experts."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import typer

from umm.cli.common import field_default, field_help
from umm.net.local import LocalNetConfig

net_app = typer.Typer(name="net", help="Run umm networks.", no_args_is_help=True, add_completion=False)


#: ``default(name)``: the default of :class:`LocalNetConfig`'s field ``name`` (the config owns it, the flags show it)
default = functools.partial(field_default, LocalNetConfig)
#: ``describe(name)``: its description, the help of the flag that sets it
describe = functools.partial(field_help, LocalNetConfig)


SUMMARY_HELP = ("Write how the run ended as JSON: published, decision, plan, merged and sources (hash, family, "
                "scores, objective), diff_vs_best_source (diff, ci_low, ci_high), nodes_holding_merged.")


def register(app: typer.Typer) -> None:
    """Add the ``umm net`` group (``local``) to the ``umm`` app."""
    app.add_typer(net_app, name="net")


@net_app.command("local")
def local_command(
    nodes: int = typer.Option(default("nodes"), "--nodes", help=describe("nodes")),
    rounds: int = typer.Option(default("rounds"), "--rounds", help=describe("rounds")),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Folder for every process's data and logs, cleared at the start "
        "(default: <umm home>/net-local)."
    ),
    variant: str = typer.Option(default("variant"), "--variant", help=describe("variant")),
    experts_dir: Path | None = typer.Option(
        None, "--experts-dir", help=describe("experts_root")
    ),
    device: str = typer.Option(default("device"), "--device", help=describe("device")),
    eval_limit: int = typer.Option(default("eval_limit"), "--eval-limit", help=describe("eval_limit")),
    test_limit: int = typer.Option(default("test_limit"), "--test-limit", help=describe("test_limit")),
    max_new_tokens: int | None = typer.Option(
        default("max_new_tokens"), "--max-new-tokens", help=describe("max_new_tokens")
    ),
    evolve_evaluations: int = typer.Option(default("evolve_evaluations"), "--evolve-evaluations", help=describe("evolve_evaluations")),
    fusion_max_steps: int = typer.Option(default("fusion_max_steps"), "--fusion-max-steps", help=describe("fusion_max_steps")),
    round_timeout: float = typer.Option(default("round_timeout"), "--round-timeout", help=describe("round_timeout")),
    margin: float = typer.Option(default("margin"), "--margin", help=describe("margin")),
    keep_state: bool = typer.Option(default("keep_state"), "--keep-state/--fresh", help=describe("keep_state")),
    summary_json: Path | None = typer.Option(None, "--summary-json", help=SUMMARY_HELP),
    dashboard: str | None = typer.Option(default("dashboard"), "--dashboard", metavar="HOST:PORT",
                                         help=describe("dashboard")),
    linger: bool = typer.Option(default("linger"), "--linger/--no-linger", help=describe("linger")),
) -> None:
    """Start a coordinator and N nodes locally, run the rounds, print the leaderboard and the merged
    model's scores beside its sources', check every node holds the verified merged model, stop all.
    Exit code 1 if any of that failed."""
    from umm import paths
    from umm.cli.common import user_errors

    with user_errors():
        cfg = LocalNetConfig(
            workdir=workdir if workdir is not None else paths.home() / "net-local", nodes=nodes, rounds=rounds,
            variant=variant, experts_root=experts_dir, device=device, eval_limit=eval_limit, test_limit=test_limit,
            max_new_tokens=max_new_tokens, evolve_evaluations=evolve_evaluations, fusion_max_steps=fusion_max_steps,
            round_timeout=round_timeout, margin=margin, keep_state=keep_state, dashboard=dashboard, linger=linger,
        )
        code = run_and_report(cfg, summary_json=summary_json)[0]
    if code:
        raise typer.Exit(code)


def run_and_report(cfg: Any, suite: Any = None, summary_json: Path | None = None) -> tuple[int, Any]:
    """Run :func:`umm.net.local.run_local_network` with progress on the console, print its result
    (and write its :class:`~umm.net.local.NetSummary` to ``summary_json``).

    Returns ``(exit code, LocalNetResult)``: 0 when every check passed, 1 otherwise (the problems
    are printed). ``suite``: an already prepared expert suite (default: ``cfg.variant``'s, built if missing).
    """
    from umm.atomic import write_json_atomic
    from umm.net.local import run_local_network, summarize
    from umm.ui import Bars, console

    result = run_local_network(cfg, suite=suite, say=lambda text: console.print(text, highlight=False, soft_wrap=True),
                               on_progress=Bars())
    print_result(result)
    if summary_json is not None:
        write_json_atomic(summary_json, summarize(result).model_dump(mode="json"), indent=1)
        console.print(f"summary written to {summary_json}", highlight=False)
    if result.ok:
        console.print(f"[bold green]ok[/]: {len(result.nodes)} node(s) hold the verified merged model "
                      f"{result.merged_hash[:12]}; logs in {cfg.workdir.expanduser().absolute() / 'logs'}")
        return 0, result
    console.print("[bold red]failed[/]:", highlight=False)
    for p in result.problems:
        console.print(f"  - {p}", highlight=False, soft_wrap=True)
    return 1, result


def leaderboard_table(entries: list[Any]) -> Any:
    """The coordinator's leaderboard (``pb.LeaderboardEntry`` rows) as a rich table."""
    from umm.ui import table

    rows = [[e.domain, str(e.rank) if e.rank else "-", e.manifest_hash[:12], e.name,
             f"{e.score:.3f}" if e.rank or e.merged else ""] for e in entries]
    return table("Leaderboard (coordinator's own scores)", ["domain", "rank", "model", "name", "score"], rows)


def comparison_table(comp: Any, names: dict[str, str]) -> Any:
    """A round's ``pb.RoundComparison``: the merged model's test scores beside its sources'."""
    from umm.ui import table

    tasks = sorted(comp.merged.scores)
    rows = []
    models = sorted(comp.sources, key=lambda m: -m.objective)
    for label, m in [("merged", comp.merged), *((names.get(s.manifest_hash, "source"), s) for s in models)]:
        rows.append([label, m.manifest_hash[:12], m.family, *[f"{m.scores.get(t, float('nan')):.3f}" for t in tasks],
                     f"{m.objective:.3f}"])
    return table("Merged model vs its sources (test split)", ["model", "hash", "family", *tasks, "objective"], rows)


def print_result(result: Any) -> None:
    """The leaderboard, the rounds, merged vs sources on the test split, and the nodes' check."""
    from umm.ui import console, table

    view = result.view
    if view is not None and view.leaderboard:
        console.print(leaderboard_table(view.leaderboard))
    if view is not None and view.rounds:
        rows = [[str(r.number), r.state, " → ".join(r.stages) or "-", (r.merged_manifest_hash or "-")[:12],
                 f"{r.objective:.3f}", r.reason] for r in sorted(view.rounds, key=lambda r: r.number)]
        console.print(table("Rounds", ["round", "state", "stages", "merged", "objective", "decision"], rows))
    last = next((r for r in reversed(result.this_run()) if r.HasField("comparison")), None)
    if last is not None:
        console.print(comparison_table(last.comparison, view.expert_names()))
    if result.nodes:
        rows = [[n.name, n.expert, "yes" if n.holds_merged else "no", n.problem] for n in result.nodes]
        console.print(table("Nodes", ["node", "serves", "holds verified merged model", "problem"], rows))
