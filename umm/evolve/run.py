"""The ``umm evolve`` pipeline: config -> search -> best recipe, merged model, history, plots, table.

Steps: validate the config, the models (compatible, same tokenizer) and the tasks (each must have
a ``search`` split); load the base model once per device and cache every source tensor there
(:class:`~umm.evolve.apply.LiveMerge`); run CMA-ES or random search (:mod:`umm.evolve.search`),
scoring each candidate in place on the ``search`` split only; save the state after every
generation; then write the best recipe, the merged model (streaming executor), the plots, and
the ``test``-split comparison with the sources and the untuned task-arithmetic and TIES merges.

Run folder contents are listed in :func:`run_evolve`'s docstring.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umm.errors import UmmError
from umm.evolve.config import EvolveConfig
from umm.evolve.report import (
    FITNESS_PNG,
    WEIGHTS_PNG,
    ComparisonRow,
    objective,
    plot_fitness,
    plot_weights,
    write_comparison,
    write_history,
)
from umm.evolve.search import Scored, generations_for, run_search
from umm.evolve.state import (
    STATE_FILE,
    Generation,
    ResumeError,
    SearchState,
    load_state,
    save_state,
    write_json_atomic,
)
from umm.evolve.transform import BoxTransform

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BEST_RECIPE = "best_recipe.yaml"
MODEL_DIR = "model"
#: config keys that may change between a run and its resume (they do not change the search)
RESUMABLE_CHANGES = frozenset({"budget", "device", "compare", "write_model", "out_dtype"})


class EvolveError(UmmError):
    """A search cannot start (bad task, bad run folder, ...)."""


@dataclass
class EvolveResult:
    run_dir: Path
    state: SearchState
    best_recipe: Path
    model_dir: Path | None
    comparison_md: str | None


# ---------------------------------------------------------------------------------------------
# Genome <-> vector layout
# ---------------------------------------------------------------------------------------------


def layer_groups(config: EvolveConfig, num_layers: int) -> int:
    """Number of layer groups for ``layer_granularity`` layers per group."""
    return max(1, min(max(1, num_layers), math.ceil(max(1, num_layers) / config.layer_granularity)))


def start_genome(config: EvolveConfig, num_layers: int) -> Any:
    """The starting genome: uniform values (weight 1/n, density 1, t 0.5), or the values of the
    recipe named by ``start`` (its models must be the config's)."""
    from umm.merge.genome import Genome

    groups = layer_groups(config, num_layers)
    if config.start == "uniform":
        return Genome.uniform(
            config.method,
            config.base_model,
            list(config.models),
            num_layers,
            groups,
            config.search_params,
            filters=list(config.filters) or None,
            global_params=dict(config.global_params),
        )
    from umm.merge.recipe import MergeRecipe

    path = Path(config.start)
    if not path.is_file():
        raise EvolveError(f"start: {path} is neither 'uniform' nor a recipe file")
    genome = Genome.from_recipe(MergeRecipe.load(path), num_layers, groups)
    if genome.method != config.method or list(genome.models) != list(config.models) or genome.base_model != config.base_model:
        raise EvolveError(
            f"start recipe {path} merges {list(genome.models)} (base {genome.base_model}, method "
            f"{genome.method}); the config has {list(config.models)} (base {config.base_model}, "
            f"method {config.method})"
        )
    return genome


def gene_names(genome: Any) -> list[str]:
    """One name per entry of ``genome.to_vector()``: ``g<group>/<model>[/<filter>]/<param>``."""
    names: list[str] = []
    sets = [*(genome.filters or ()), "other"] if genome.filters else [None]
    for g in range(genome.groups):
        for m in genome.models:
            for s in sets:
                for p in genome.param_names:
                    mid = f"/{s}" if s is not None else ""
                    names.append(f"g{g}/{Path(str(m)).name}{mid}/{p}")
    return names


def gene_bounds(genome: Any, config: EvolveConfig) -> BoxTransform:
    """Bounds of every gene, from its parameter name (``config.bounds`` or the defaults)."""
    shape = np.asarray(genome.values).shape
    low = np.empty(shape)
    high = np.empty(shape)
    for k, p in enumerate(genome.param_names):
        lo, hi = config.bounds_for(p)
        low[..., k], high[..., k] = lo, hi
    return BoxTransform(low.reshape(-1), high.reshape(-1))


def layer_weights(genome: Any, param: str = "weight") -> np.ndarray | None:
    """``[model, layer]`` values of ``param`` (mean over filter sets), or None if not searched."""
    if param not in genome.param_names:
        return None
    k = list(genome.param_names).index(param)
    values = np.asarray(genome.values4, dtype=np.float64)[..., k]  # [groups, models, sets]
    layers = max(1, genome.num_layers)
    return np.stack([values[genome.group_of_layer(L)].mean(axis=-1) for L in range(layers)], axis=1)


# ---------------------------------------------------------------------------------------------
# Tasks and scoring
# ---------------------------------------------------------------------------------------------


def check_tasks(config: EvolveConfig) -> list[Any]:
    """Resolve every task; each must have items in its ``search`` split."""
    from umm.eval import get_task

    tasks = []
    for spec in config.tasks:
        task = get_task(spec.name)
        items = list(task.samples("search", limit=1, seed=config.seed))
        if not items:
            raise EvolveError(
                f"task {spec.name!r} has no 'search' split: the search only scores candidates on "
                "'search' (never on 'test'); use a task with a search split"
            )
        tasks.append(task)
    return tasks


class Worker:
    """One device: a live model, its tokenizer and the cached sources; scores genome vectors."""

    def __init__(self, config: EvolveConfig, genome: Any, tasks: Sequence[Any], device: str) -> None:
        import torch

        from umm.checkpoints.loading import load_causal_lm, load_tokenizer, resolve_dtype
        from umm.evolve.apply import LiveMerge

        self.config = config
        self.genome = genome
        self.tasks = list(tasks)
        self.device = device
        ref = config.base_model or config.models[0]
        self.model = load_causal_lm(ref, device=device, dtype=config.dtype)
        self.model.eval()
        self.tokenizer = load_tokenizer(ref)
        self.live = LiveMerge(
            genome.to_recipe(), self.model, device=device, cache_dtype=resolve_dtype(config.dtype) or torch.float32
        )

    def evaluate(self, split: str) -> dict[str, Any]:
        """Task name -> TaskScore of the live model on ``split`` (per-task subset sizes)."""
        from umm.eval import evaluate

        out: dict[str, Any] = {}
        for spec, task in zip(self.config.tasks, self.tasks):
            limit = spec.search_size if split == "search" else spec.test_size
            result = evaluate(
                self.model, self.tokenizer, [task], split=split, limit=limit, seed=self.config.seed,
                batch_size=self.config.batch_size, device=self.device, show_progress=False,
            )
            out[spec.name] = _task_score(result, spec.name)
        return out

    def score(self, x: np.ndarray) -> Scored:
        t0 = time.perf_counter()
        recipe = self.genome.with_vector(np.asarray(x)).to_recipe()
        apply_s = self.live.apply(recipe)
        scores = {k: float(v.score) for k, v in self.evaluate("search").items()}
        weights = {t.name: t.weight for t in self.config.tasks}
        return Scored(scores, objective(scores, weights), time.perf_counter() - t0, apply_s)


def _task_score(result: Any, name: str) -> Any:
    """The TaskScore of ``name`` in an EvalResult (a mapping or a list of scores)."""
    scores = getattr(result, "scores", None)
    if scores is None:
        scores = getattr(result, "tasks", result)
    if isinstance(scores, dict):
        return scores[name]
    for s in scores:
        if getattr(s, "task", None) == name:
            return s
    raise RuntimeError(f"the evaluator returned no score for task {name!r}")


def devices_for(config: EvolveConfig) -> list[str]:
    """One device per visible CUDA GPU for ``auto``/``cuda`` when several are visible, else one."""
    import torch

    from umm.checkpoints.loading import resolve_device

    dev = config.device
    if dev in ("auto", "cuda") and torch.cuda.is_available():
        n = torch.cuda.device_count()
        return [f"cuda:{i}" for i in range(n)] if n > 1 else ["cuda:0"]
    return [str(resolve_device(dev))]


def make_evaluator(
    workers: Sequence[Worker], on_candidate: Callable[[Scored], None] | None = None
) -> Callable[[Sequence[np.ndarray], int], list[Scored]]:
    """Serial with one worker; with several, candidates are spread over them (one thread each).
    ``on_candidate`` is called after each scored candidate (from the calling thread if serial)."""

    def done(r: Scored) -> Scored:
        if on_candidate is not None:
            on_candidate(r)
        return r

    def serial(xs: Sequence[np.ndarray], generation: int) -> list[Scored]:
        return [done(workers[0].score(x)) for x in xs]

    if len(workers) == 1:
        return serial

    def parallel(xs: Sequence[np.ndarray], generation: int) -> list[Scored]:
        results: list[Scored | None] = [None] * len(xs)

        def run(w: int) -> None:
            for i in range(w, len(xs), len(workers)):
                results[i] = done(workers[w].score(xs[i]))

        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            for f in [pool.submit(run, w) for w in range(len(workers))]:
                f.result()
        return [r for r in results if r is not None]

    return parallel


# ---------------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------------


def default_run_dir(config_path: str | Path, config: EvolveConfig) -> Path:
    from umm.paths import home

    return home() / "runs" / f"evolve-{Path(config_path).stem}-{config.optimizer}-seed{config.seed}"


def _config_record(config: EvolveConfig) -> dict[str, Any]:
    return json.loads(config.model_dump_json())


def prepare_run_dir(run_dir: Path, config: EvolveConfig, resume: bool) -> SearchState | None:
    """Create the run folder, or check that a resumed one was started with the same search."""
    state_path = run_dir / STATE_FILE
    if resume:
        state = load_state(run_dir)
        try:
            saved = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ResumeError(f"cannot resume {run_dir}: its {CONFIG_FILE} is unreadable ({exc})") from None
        now = _config_record(config)
        diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if diff:
            raise ResumeError(
                f"cannot resume {run_dir}: the config differs from the one it was started with in "
                f"{', '.join(diff)} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
            )
        return state
    if state_path.exists():
        raise EvolveError(
            f"{run_dir} already holds a search; continue it with --resume or choose another --run-dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG_FILE, _config_record(config))
    return None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


def run_evolve(
    config: EvolveConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_generation: Callable[[SearchState, Generation, int], None] | None = None,
) -> EvolveResult:
    """Run a search and write its outputs into ``run_dir``:

    ``config.json``, ``search_state.json`` (resume point) and ``history.jsonl`` (both rewritten
    after every generation), then at the end ``fitness.png``,
    ``weights.png``, ``best_recipe.yaml`` (runs in ``umm merge`` and ``mergekit-yaml``),
    ``model/`` (the merged model, if ``write_model``), ``comparison.md``/``.json`` (test split,
    if ``compare``). ``on_generation(state, generation, total_generations)`` reports progress.
    """
    from umm.checkpoints.reader import Checkpoint

    run_dir = Path(run_dir)
    tasks = check_tasks(config)
    with Checkpoint.open(config.base_model or config.models[0]) as ref:
        num_layers = ref.num_layers or 0
    genome = start_genome(config, num_layers)
    transform = gene_bounds(genome, config)
    names = gene_names(genome)
    z0 = transform.to_unbounded(np.asarray(genome.to_vector(), dtype=np.float64))
    population = config.population_size(transform.dimension)
    generations = generations_for(config.budget.evaluations, population)

    state = prepare_run_dir(run_dir, config, resume)
    fresh = SearchState(
        optimizer=config.optimizer, seed=config.seed, dimension=transform.dimension,
        population=population, sigma0=config.sigma0, z0=[float(v) for v in z0],
    )
    if state is None:
        state = fresh
    elif state.settings() != fresh.settings():
        raise ResumeError(f"cannot resume {run_dir}: its search settings differ from the config's")

    devices = devices_for(config)
    workers = [Worker(config, genome, tasks, d) for d in devices]
    from umm.ui import progress as progress_bar

    total = 1 + generations * population
    bar = progress_bar(total=total, desc=f"evolve ({config.optimizer})", unit="candidate")
    bar.update(min(total, state.evaluations))
    best_seen = [max((c.fitness for g in state.generations for c in g.candidates), default=-math.inf)]

    def tick(r: Scored) -> None:
        if math.isfinite(r.fitness):
            best_seen[0] = max(best_seen[0], r.fitness)
        bar.set_postfix(best=f"{best_seen[0]:.4f}", s_per_candidate=f"{r.seconds:.2f}", refresh=False)
        bar.update(1)

    evaluate = make_evaluator(workers, tick)

    def save(s: SearchState) -> None:
        save_state(run_dir, s)
        write_history(run_dir, s, names)

    def progress(s: SearchState, g: Generation) -> None:
        if on_generation is not None:
            on_generation(s, g, generations)

    t0 = time.perf_counter()
    try:
        run_search(
            state, transform, evaluate, generations=generations, max_seconds=config.budget.seconds,
            save=save, on_generation=progress,
        )
    finally:
        bar.close()
    logger.info("search finished in %.1f s (this session)", time.perf_counter() - t0)

    plot_fitness(state, run_dir / FITNESS_PNG, title=f"{config.optimizer} search, {config.method}")
    best = state.best()
    assert best is not None
    best_genome = genome.with_vector(np.asarray(best.x))
    best_recipe = best_genome.to_recipe(**({"out_dtype": config.out_dtype} if config.out_dtype else {}))
    recipe_path = run_dir / BEST_RECIPE
    _write_text_atomic(recipe_path, best_recipe.to_yaml())
    shown = "weight" if "weight" in best_genome.param_names else best_genome.param_names[0]
    weights = layer_weights(best_genome, shown)
    if weights is not None:
        plot_weights(
            weights, [Path(str(m)).name for m in best_genome.models], run_dir / WEIGHTS_PNG,
            title=f"best genome: per-layer {shown} per model",
        )

    model_dir: Path | None = None
    if config.write_model:
        from umm.merge.executor import merge

        model_dir = run_dir / MODEL_DIR
        merge(best_recipe, model_dir, device=devices[0], overwrite=True, show_progress=True)

    md = None
    if config.compare:
        rows = compare_on_test(config, workers[0], best_recipe)
        md = write_comparison(run_dir, rows, {t.name: t.weight for t in config.tasks})
    return EvolveResult(run_dir, state, recipe_path, model_dir, md)


#: the "untuned" merges of the final table: textbook settings, never tuned on any split
UNTUNED = {
    "task_arithmetic": {"weight": 1.0},  # base + sum of task vectors (lambda 1)
    "ties": {"weight": 1.0, "density": 0.5},  # keep the top half of each task vector, sign consensus
}


def untuned_recipe(config: EvolveConfig, method: str) -> Any:
    """``method`` over the config's models and base with the fixed settings of :data:`UNTUNED`."""
    from umm.merge.recipe import MergeRecipe

    return MergeRecipe.from_dict(
        {
            "merge_method": method,
            "base_model": config.base_model,
            "models": [{"model": p, "parameters": dict(UNTUNED[method])} for p in config.models],
            "dtype": "float32",
        },
        source=f"untuned {method}",
    )


def compare_on_test(config: EvolveConfig, worker: Worker, best_recipe: Any) -> list[ComparisonRow]:
    """Test-split scores of the evolved merge, each source, and untuned TA / TIES merges."""
    weights = {t.name: t.weight for t in config.tasks}

    def row(name: str) -> ComparisonRow:
        s = worker.evaluate("test")
        scores = {k: float(v.score) for k, v in s.items()}
        return ComparisonRow(
            name=name,
            scores=scores,
            ci={k: (float(v.ci_low), float(v.ci_high)) for k, v in s.items()},
            n={k: int(v.n) for k, v in s.items()},
            objective=objective(scores, weights),
        )

    rows = []
    worker.live.apply(best_recipe)
    rows.append(row(f"evolved ({config.optimizer}, {config.method})"))
    for i, path in enumerate(worker.live.model_paths):
        worker.live.load_source(i)
        role = "base" if i == worker.live.base_index else "source"
        rows.append(row(f"{role}: {Path(path).name}"))
    if config.base_model is not None:
        for method in ("task_arithmetic", "ties"):
            worker.live.apply(untuned_recipe(config, method))
            rows.append(row(f"untuned {method}"))
    else:
        logger.info("no base_model: the untuned task-arithmetic and TIES rows are left out")
    return rows
