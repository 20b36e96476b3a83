"""What a search leaves in its run folder besides the model: history, plots and the final table.

- ``history.jsonl``: one line per evaluated candidate (generation, candidate, genome as named
  genes, per-task scores, fitness, seconds, of which applying), rewritten atomically from the
  search state after every generation, so it never holds an unfinished generation.
- ``fitness.png``: best-so-far, best-of-generation and mean fitness per generation (drawn when
  the search ends; the history has the same numbers at every generation).
- ``weights.png``: heatmap of the final per-layer weight of every model.
- ``comparison.md`` / ``comparison.json``: test-split scores with 95% intervals of the evolved
  merge, each source and the untuned merges.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from umm.evolve.state import SearchState, write_json_atomic

logger = logging.getLogger(__name__)

HISTORY_FILE = "history.jsonl"
FITNESS_PNG = "fitness.png"
WEIGHTS_PNG = "weights.png"


def write_history(run_dir: Path, state: SearchState, gene_names: Sequence[str]) -> Path:
    """Rewrite ``history.jsonl`` from ``state`` (atomic rename)."""
    path = Path(run_dir) / HISTORY_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for gen in state.generations:
            for c in gen.candidates:
                row = {
                    "generation": c.generation,
                    "candidate": c.index,
                    "genome": {n: v for n, v in zip(gene_names, c.x)},
                    "scores": c.scores,
                    "fitness": c.fitness if math.isfinite(c.fitness) else None,
                    "seconds": round(c.seconds, 4),
                    "apply_seconds": round(c.apply_seconds, 4),
                }
                fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


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


def _save_figure(fig, path: Path) -> None:  # noqa: ANN001 - matplotlib Figure
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_fitness(state: SearchState, path: Path, *, title: str = "") -> Path:
    """Line plot of :func:`fitness_curves` (generation 0 is the starting point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = fitness_curves(state)
    gens = [g.index for g in state.generations]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(gens, curves["best"], label="best so far", lw=2)
    ax.plot(gens, curves["generation_best"], label="best of generation", ls="--", marker=".")
    ax.plot(gens, curves["mean"], label="mean of generation", ls=":", marker=".")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generation (0 = starting point)")
    ax.set_ylabel("fitness (search split)")
    ax.set_title(title or f"{state.optimizer} search")
    ax.grid(alpha=0.3)
    ax.legend()
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


@dataclass(frozen=True)
class ComparisonRow:
    """One model in the final table: per-task score and 95% interval on ``test``, and the objective."""

    name: str
    scores: dict[str, float]
    ci: dict[str, tuple[float, float]]
    n: dict[str, int]
    objective: float


def objective(scores: dict[str, float], weights: dict[str, float]) -> float:
    """The fitness: the weighted sum of task scores."""
    return float(sum(weights[t] * scores[t] for t in weights))


def write_comparison(run_dir: Path, rows: Sequence[ComparisonRow], weights: dict[str, float]) -> str:
    """Write ``comparison.json`` and ``comparison.md``; return the markdown table."""
    tasks = list(weights)
    header = "| model | " + " | ".join(f"{t} (test, 95% CI)" for t in tasks) + " | objective |"
    lines = [header, "|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        cells = [f"{r.scores[t]:.3f} [{r.ci[t][0]:.3f}, {r.ci[t][1]:.3f}] (n={r.n[t]})" for t in tasks]
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {r.objective:.3f} |")
    md = "\n".join(lines) + "\n"
    weights_text = ", ".join(f"{w:g}·{t}" for t, w in weights.items())
    (Path(run_dir) / "comparison.md").write_text(
        f"Objective = {weights_text} on the test split.\n\n{md}", encoding="utf-8"
    )
    write_json_atomic(
        Path(run_dir) / "comparison.json",
        {"weights": weights, "rows": [asdict(r) for r in rows]},
    )
    return md
