"""What a search leaves in its run folder besides the model: history, plots and the final table.

- ``history.jsonl``: one line per evaluated candidate (generation, candidate, genome as named
  genes, per-task scores, fitness, seconds, of which applying), rewritten atomically from the
  search state after every generation, so it never holds an unfinished generation.
- ``fitness.png``: best-so-far, best-of-generation and mean fitness per generation (drawn when
  the search ends; the history has the same numbers at every generation), with each source's
  and each untuned baseline's objective on the same ``search`` items as labelled horizontal lines
  (``references.json``), and the random-search baseline's best so far when it ran.
- ``weights.png``: heatmap of the final per-layer weight of every model.
- ``comparison.md`` / ``comparison.json``: the final table on ``test`` (:class:`Comparison`).

The objective (the search's fitness, and every objective in these files) is the weighted
**mean** of the task scores, ``sum_t w_t * score_t / sum_t w_t`` (:func:`objective`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from umm.atomic import atomic_path, write_json_atomic, write_text_atomic
from umm.eval.stats import PairedDifference, weighted_mean
from umm.evolve.state import SearchState, json_safe

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
FITNESS_PNG = "fitness.png"
WEIGHTS_PNG = "weights.png"
REFERENCES_FILE = "references.json"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"
#: how the objective is computed, written into comparison.json and the plots
OBJECTIVE_FORMULA = "weighted mean of the task scores: sum_t w_t * score_t / sum_t w_t"


def objective(scores: dict[str, float], weights: dict[str, float]) -> float:
    """The fitness and objective: the weighted mean ``sum_t w_t s_t / sum_t w_t`` of task scores."""
    return weighted_mean(scores, weights)


def write_history(run_dir: Path, state: SearchState, gene_names: Sequence[str]) -> Path:
    """Rewrite ``history.jsonl`` from ``state`` (atomic rename)."""
    rows = [
        {
            "generation": c.generation,
            "candidate": c.index,
            "genome": {n: v for n, v in zip(gene_names, c.x)},
            "scores": c.scores,
            "fitness": c.fitness if math.isfinite(c.fitness) else None,
            "seconds": round(c.seconds, 4),
            "apply_seconds": round(c.apply_seconds, 4),
        }
        for gen in state.generations
        for c in gen.candidates
    ]
    return write_text_atomic(Path(run_dir) / HISTORY_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def fitness_curves(state: SearchState) -> dict[str, list[float]]:
    """Per generation: ``best`` (so far), ``generation_best`` and ``mean`` fitness (NaN skipped)."""
    best_so_far, gen_best, mean = [], [], []
    running = -math.inf
    for gen in state.generations:
        vals = [c.fitness for c in gen.candidates if math.isfinite(c.fitness)]
        gb = max(vals) if vals else math.nan
        running = max(running, gb) if vals else running
        best_so_far.append(running)
        gen_best.append(gb)
        mean.append(float(np.mean(vals)) if vals else math.nan)
    return {"best": best_so_far, "generation_best": gen_best, "mean": mean}


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=120, bbox_inches="tight")


def plot_fitness(
    state: SearchState,
    path: Path,
    *,
    title: str = "",
    references: Sequence[Reference] = (),
    random_state: SearchState | None = None,
) -> Path:
    """Line plot of :func:`fitness_curves` (generation 0 is the starting point).

    Each of ``references`` (a source's or an untuned merge's objective on the same ``search``
    items) is a labelled horizontal dashed line; ``random_state``'s best so far (the random-search
    baseline with the same budget) is a thin curve. The search's "best so far" is drawn last, on
    top, thicker and in black, so no reference line hides it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = fitness_curves(state)
    gens = [g.index for g in state.generations]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = plt.get_cmap("tab10").colors
    for i, ref in enumerate(references):
        ax.axhline(ref.objective, color=colours[(i + 3) % len(colours)], ls="--" if ref.kind == "source" else "-.",
                   lw=1.2, zorder=1, label=f"{ref.name} ({ref.objective:.3f})")
    if random_state is not None and random_state.generations:
        rgens = [g.index for g in random_state.generations]
        ax.plot(rgens, fitness_curves(random_state)["best"], color="tab:gray", lw=1.5, zorder=2,
                label="random search: best so far")
    ax.plot(gens, curves["mean"], label="mean of generation", ls=":", marker=".", color="tab:green", zorder=3)
    ax.plot(gens, curves["generation_best"], label="best of generation", ls="--", marker=".", color="tab:orange",
            zorder=4)
    ax.plot(gens, curves["best"], label=f"best so far ({curves['best'][-1]:.3f})", lw=2.8, color="black", zorder=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation (0 = starting point)")
    ax.set_ylabel("objective: weighted mean score (search split)")
    ax.set_title(title or f"{state.optimizer} search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_weights(weights: np.ndarray, model_names: Sequence[str], path: Path, *, title: str = "") -> Path:
    """Heatmap of ``weights[model, layer]`` with the values written in small grids."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = np.asarray(weights, dtype=np.float64)
    n_models, n_layers = weights.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_layers + 2), 0.6 * n_models + 1.6))
    im = ax.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(n_models), labels=list(model_names))
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer")
    ax.set_title(title or "final per-layer weight per model")
    if n_models * n_layers <= 200:
        for i in range(n_models):
            for j in range(n_layers):
                ax.text(j, i, f"{weights[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax)
    _save_figure(fig, path)
    plt.close(fig)
    return path


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Reference(_Frozen):
    """A source's or an untuned baseline's scores and objective on the search items (plot lines)."""

    name: str
    kind: Literal["source", "baseline"]
    scores: dict[str, float]
    objective: float


class References(_Frozen):
    """``references.json``: computed once at the start of a run; a resume reuses them."""

    split: Literal["search"] = "search"
    rows: list[Reference]


def load_references(run_dir: Path) -> dict[str, Reference]:
    """The stored references of ``run_dir`` by name (empty if none or unreadable: recomputed)."""
    path = Path(run_dir) / REFERENCES_FILE
    try:
        return {r.name: r for r in References.model_validate_json(path.read_text(encoding="utf-8")).rows}
    except (OSError, ValueError) as exc:
        if path.exists():
            logger.warning("%s is unreadable (%s); computing the references again", path, exc)
        return {}


def save_references(run_dir: Path, rows: Sequence[Reference]) -> Path:
    path = Path(run_dir) / REFERENCES_FILE
    write_json_atomic(path, json_safe(References(rows=list(rows)).model_dump(mode="json")))
    return path


class ComparisonRow(_Frozen):
    """One model of the final table, on the ``test`` split.

    ``scores``: task -> accuracy; ``ci``: task -> 95% Wilson interval; ``n``: task -> number of
    test items scored (a mapping, since tasks may have different ``test_size``); ``objective``:
    :func:`objective` of ``scores``; ``path``: the model folder, when the row is one on disk.
    """

    name: str
    kind: Literal["evolved", "source", "baseline", "previous"]
    scores: dict[str, float]
    objective: float
    n: dict[str, int]
    ci: dict[str, tuple[float, float]]
    path: str | None = None
    #: the model's family (architecture and tokenizer fingerprints, short), when several are compared
    family: str | None = None


class Comparison(_Frozen):
    """``comparison.json``: the final ``test`` table and the evolved merge's gain over its best source.

    ``evolved_minus_best_source`` is the paired bootstrap
    (:func:`umm.eval.stats.paired_bootstrap_difference`, ``resamples`` replicates, ``seed``) of
    objective(evolved) - objective(best source) over the test items, the best source being the
    ``kind == "source"`` row with the highest objective (``best_source``). ``eval_commands`` give
    the evolved row's scores again with ``umm eval`` (one command per distinct test size).
    ``umm combine`` also compares with the previously published model (the ``kind == "previous"``
    row named ``previous``): ``evolved_minus_previous`` is the same bootstrap against it.
    """

    split: Literal["test"] = "test"
    objective: str = OBJECTIVE_FORMULA
    weights: dict[str, float]
    rows: list[ComparisonRow]
    best_source: str
    evolved_minus_best_source: PairedDifference
    resamples: int
    seed: int
    eval_commands: list[str] = []
    previous: str | None = None
    evolved_minus_previous: PairedDifference | None = None


def comparison_markdown(comparison: Comparison) -> str:
    """The table of ``comparison`` as markdown (scores with 95% intervals, n, objective)."""
    tasks = list(comparison.weights)
    header = "| model | kind | " + " | ".join(f"{t} (test, 95% CI)" for t in tasks) + " | objective |"
    lines = [header, "|" + "---|" * (len(tasks) + 3)]
    for r in comparison.rows:
        cells = [f"{r.scores[t]:.3f} [{r.ci[t][0]:.3f}, {r.ci[t][1]:.3f}] (n={r.n[t]})" for t in tasks]
        lines.append(f"| {r.name} | {r.kind} | " + " | ".join(cells) + f" | {r.objective:.3f} |")
    d = comparison.evolved_minus_best_source
    lines.append("")
    lines.append(f"evolved - best source ({comparison.best_source}): {d.diff:+.3f} "
                 f"[{d.ci_low:+.3f}, {d.ci_high:+.3f}] (paired bootstrap over test items, 95%)")
    p = comparison.evolved_minus_previous
    if p is not None:
        lines.append(f"evolved - previous ({comparison.previous}): {p.diff:+.3f} "
                     f"[{p.ci_low:+.3f}, {p.ci_high:+.3f}] (paired bootstrap over test items, 95%)")
    return "\n".join(lines) + "\n"


def write_comparison(run_dir: Path, comparison: Comparison) -> str:
    """Write ``comparison.json`` and ``comparison.md``; return the markdown table."""
    md = comparison_markdown(comparison)
    weights_text = ", ".join(f"{w:g}·{t}" for t, w in comparison.weights.items())
    commands = "".join(f"    {c}\n" for c in comparison.eval_commands)
    text = f"Objective = {comparison.objective} (weights {weights_text}), on the test split.\n\n{md}"
    if commands:
        text += f"\nThe evolved row's scores again:\n\n{commands}"
    write_text_atomic(Path(run_dir) / COMPARISON_MD, text)
    write_json_atomic(Path(run_dir) / COMPARISON_JSON, json_safe(comparison.model_dump(mode="json")))
    return md
