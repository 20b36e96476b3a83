"""Demonstration of ``umm evolve`` on the tiny expert suite: math + code experts, one search.

    python bench/demo_evolve.py [--variant full] [--dir DIR] [--run-dir DIR] [--threads 1]
                                [--no-compare] [--set key=value ...]

What it does (prints figures, asserts nothing):

1. Writes the config of the demonstration (:func:`demo_config`) with the cached suite's paths
   (``umm experts prepare --variant full`` builds the suite if it is missing) to
   ``<run-dir>/demo_config.yaml``, so the same search runs with ``umm evolve`` too.
2. Runs the search (:func:`umm.evolve.run.run_evolve`): fitness = synth-math + synth-code on a
   fixed, seeded subset of the ``search`` split only.
3. Unless ``--no-compare``: the run's final table on the ``test`` split (the evolved merge, each
   source, the untuned task-arithmetic and TIES merges), with 95% intervals, and the check of the
   issue: the evolved merge's objective is above every other row's.
4. Held-out search items: the best recipe and each source on the ``search`` items the fitness
   never saw (``--holdout``), the estimate used to judge settings without touching ``test``.

Settings (:data:`SETTINGS`, :data:`START_WEIGHTS`), chosen on the ``search`` split only:
task arithmetic, one weight gene per layer per expert (8 genes), weights in [0, 1.5], CMA-ES
with 8 candidates per generation, sigma0 0.5, 81 evaluations, all 256 search items per task,
started from math 1.2 / code 0.6 (the best of nine hand-set merges on the 256 search items:
0.639, against 0.633 for 1.0 / 0.7 and 0.523 for the uniform 0.5 / 0.5; a search from the
uniform start with 64-128 items reached 0.609 on search and lost to the code expert on test).
The final table adds untuned task arithmetic (1/1), TIES (density 1) and random search with the
same budget and start.
``--set key=value`` overrides one top-level, ``budget.`` or ``tasks.`` key (YAML value).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import yaml

#: the demonstration's search settings (chosen on the search split; see the module docstring)
SETTINGS: dict[str, Any] = {
    "method": "task_arithmetic",
    "layer_granularity": 1,
    "filters": [],
    "bounds": {"weight": [0.0, 1.5]},
    "optimizer": "cma",
    "population": 8,
    "sigma0": 0.5,
    "seed": 0,
    "budget": {"evaluations": 81, "seconds": None},
    "batch_size": 16,
    "dtype": "float32",
    "device": "cpu",
    "write_model": True,
    "compare": True,
    "baselines": ["task_arithmetic", "ties", "random"],
}
SEARCH_SIZE = 256  # the whole search pool of each task
TEST_SIZE = None  # the whole test pool (256 items per task)
#: the starting recipe (task arithmetic, one weight per expert; see the README for why)
START_WEIGHTS = {"math": 1.2, "code": 0.6}


def write_start_recipe(suite: Any, path: Path, weights: dict[str, float]) -> Path:
    """A task-arithmetic recipe of the suite's math and code experts with ``weights``."""
    from umm.merge.recipe import MergeRecipe

    math_m, code_m = suite.expert_for("math"), suite.expert_for("code")
    recipe = MergeRecipe.from_dict({
        "merge_method": "task_arithmetic",
        "base_model": str(suite.path(suite.base_of(math_m))),
        "models": [{"model": str(suite.path(m)), "parameters": {"weight": weights[d]}}
                   for m, d in ((math_m, "math"), (code_m, "code"))],
        "dtype": "float32",
    })
    path.write_text(recipe.to_yaml(), encoding="utf-8")
    return path


def demo_config(suite: Any, start: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The evolve config (a plain mapping) for ``suite``'s math and code experts and their base,
    starting from the recipe ``start`` (or ``uniform``)."""
    math_m, code_m = suite.expert_for("math"), suite.expert_for("code")
    base = suite.base_of(math_m)
    cfg: dict[str, Any] = {
        "models": [str(suite.path(math_m)), str(suite.path(code_m))],
        "base_model": str(suite.path(base)),
        "tasks": [
            {"name": "synth-math", "weight": 1.0, "search_size": SEARCH_SIZE, "test_size": TEST_SIZE},
            {"name": "synth-code", "weight": 1.0, "search_size": SEARCH_SIZE, "test_size": TEST_SIZE},
        ],
        **json.loads(json.dumps(SETTINGS)),
        "start": start,
    }
    for key, value in (overrides or {}).items():
        if key.startswith("budget."):
            cfg["budget"][key.split(".", 1)[1]] = value
        elif key.startswith("tasks."):  # tasks.search_size=N: every task
            for t in cfg["tasks"]:
                t[key.split(".", 1)[1]] = value
        else:
            cfg[key] = value
    return cfg


def holdout_scores(worker: Any, config: Any, recipes: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Scores on the ``search`` items outside the fitness subset (never used by the search).

    The subset is the first ``search_size`` items of the seeded order of the split, so the
    held-out score is ``(N * all - n * subset) / (N - n)`` from two evaluations.
    """
    from umm.eval import evaluate

    out: dict[str, dict[str, float]] = {}
    for label, apply in recipes.items():
        apply()
        scores: dict[str, float] = {}
        for spec, task in zip(config.tasks, worker.tasks):
            full = evaluate(worker.model, worker.tokenizer, [task], split="search", limit=None, seed=config.seed,
                            batch_size=config.batch_size, device=worker.device, show_progress=False)
            sub = evaluate(worker.model, worker.tokenizer, [task], split="search", limit=spec.search_size,
                           seed=config.seed, batch_size=config.batch_size, device=worker.device, show_progress=False)
            f, s = _score(full, spec.name), _score(sub, spec.name)
            held = f.n - s.n
            scores[spec.name] = (f.n * f.score - s.n * s.score) / held if held > 0 else float("nan")
            scores[f"{spec.name}:n"] = held
        out[label] = scores
    return out


def _score(result: Any, name: str) -> Any:
    return result.scores[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="full")
    ap.add_argument("--dir", default=None, help="parent folder of the suite (default: umm's experts cache)")
    ap.add_argument("--run-dir", default=str(Path(__file__).parent / "out" / "demo_evolve"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compare", action="store_true", help="skip the test-split table (while exploring)")
    ap.add_argument("--holdout", action="store_true", help="score the best recipe on held-out search items")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    from umm.evolve.config import parse_config
    from umm.evolve.run import Worker, check_tasks, run_evolve
    from umm.experts.build import SuiteNotBuiltError, ensure_suite, load_suite
    from umm.merge.recipe import MergeRecipe
    from umm.ui import Bars, console

    torch.set_num_threads(args.threads)
    try:
        suite = load_suite(args.variant, args.dir)
    except SuiteNotBuiltError:
        suite = ensure_suite(args.variant, args.dir, on_progress=Bars())
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    if args.no_compare:
        overrides.update({"compare": False, "write_model": False})
    run_dir = Path(args.run_dir)
    if run_dir.exists() and (run_dir / "search_state.json").exists():
        raise SystemExit(f"{run_dir} holds a finished or started search; pass another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    start = str(write_start_recipe(suite, run_dir / "start_recipe.yaml", START_WEIGHTS))
    data = demo_config(suite, start, overrides)
    (run_dir / "demo_config.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    config = parse_config(data, source="demo_evolve")

    t0 = time.perf_counter()
    result = run_evolve(config, run_dir, on_progress=Bars())
    seconds = time.perf_counter() - t0
    best = result.state.best()
    assert best is not None
    console.print(f"search + outputs: {seconds:.0f} s, {result.state.evaluations} candidates; best search "
                  f"fitness {best.fitness:.3f} {best.scores} (generation {best.generation})")
    console.print(f"best recipe: {result.best_recipe}")
    summary: dict[str, Any] = {"seconds": seconds, "evaluations": result.state.evaluations,
                               "best_search": {"fitness": best.fitness, "scores": best.scores}}
    if result.comparison_md is not None:
        rows = json.loads((run_dir / "comparison.json").read_text())["rows"]
        evolved, others = rows[0], rows[1:]
        holds = all(evolved["objective"] > r["objective"] for r in others)
        console.print(f"\ntest split, objective = mean of synth-math and synth-code:\n\n{result.comparison_md}")
        console.print(f"evolved merge above every source and untuned merge on test: {'yes' if holds else 'NO'}")
        summary["holds"] = holds
    if args.holdout:
        from umm.evolve.run import start_genome

        worker = Worker(config, start_genome(config, suite_num_layers(config)), check_tasks(config), "cpu")
        best_recipe = MergeRecipe.load(result.best_recipe)
        held = holdout_scores(worker, config, {
            "evolved": lambda: worker.live.apply(best_recipe),
            **{f"source {Path(p).name}": (lambda i=i: worker.live.load_source(i))
               for i, p in enumerate(worker.live.model_paths)},
        })
        for label, s in held.items():
            vals = [v for k, v in s.items() if not k.endswith(":n")]
            obj = sum(vals) / len(vals)  # the objective: the (equal-weight) mean of the task scores
            console.print(f"held-out search items: {label}: {json.dumps(s)} objective {obj:.3f}")
        summary["holdout"] = held
    (run_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")


def suite_num_layers(config: Any) -> int:
    from umm.checkpoints.reader import Checkpoint

    with Checkpoint.open(config.base_model or config.models[0]) as ref:
        return ref.num_layers or 0


if __name__ == "__main__":
    main()
