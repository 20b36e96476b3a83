"""The ``umm evolve`` pipeline: config -> search -> best recipe, merged model, history, plots, table.

Steps: validate the config, the models (compatible, same tokenizer) and the tasks (each must have
a ``search`` split); load the base model once per device and cache every source tensor there
(:class:`~umm.evolve.apply.LiveMerge`); score each source and each untuned baseline on the
``search`` items once (the plot's reference lines); run CMA-ES or random search
(:mod:`umm.evolve.search`), scoring each candidate in place on the ``search`` split only; save
the state after every generation; run the random-search baseline with the same budget and seed
(its own state in ``random/``); then write the best recipe, the merged model (streaming
executor), the plots, and the ``test``-split comparison (:class:`~umm.evolve.report.Comparison`)
of the evolved merge with the sources and the baselines.

The fitness and every objective is the weighted mean of the task scores
(:func:`umm.evolve.report.objective`).

Run folder contents are listed in :func:`run_evolve`'s docstring.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from umm.atomic import write_json_atomic, write_text_atomic
from umm.errors import UmmError
from umm.eval.stats import PairedDifference, paired_bootstrap_difference
from umm.evolve.config import EvolveConfig
from umm.evolve.report import (
    FITNESS_PNG,
    WEIGHTS_PNG,
    Comparison,
    ComparisonRow,
    Reference,
    load_references,
    objective,
    plot_fitness,
    plot_weights,
    save_references,
    write_comparison,
    write_history,
)
from umm.evolve.search import EvaluateFn, Scored, generations_for, run_search
from umm.evolve.state import (
    STATE_FILE,
    Generation,
    ResumeError,
    SearchState,
    json_safe,
    load_state,
    save_state,
)
from umm.evolve.transform import BoxTransform
from umm.progress import ProgressSink, open_bar

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
BEST_RECIPE = "best_recipe.yaml"
MODEL_DIR = "merged"
#: sub-folder of the random-search baseline's own state and history
RANDOM_DIR = "random"
#: config keys that may change between a run and its resume (they do not change the search)
RESUMABLE_CHANGES = frozenset({"budget", "device", "compare", "write_model", "out_dtype", "baselines", "backend",
                               "ray", "ray_actors", "ray_threads"})
#: bootstrap replicates and seed of ``evolved_minus_best_source``
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


class EvolveError(UmmError):
    """A search cannot start (bad task, bad run folder, ...)."""


@dataclass
class EvolveResult:
    run_dir: Path
    state: SearchState
    best_recipe: Path
    model_dir: Path | None
    comparison_md: str | None
    comparison: Comparison | None = None
    random_state: SearchState | None = None


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
    """One device: a live model, its tokenizer and the cached sources; scores genome vectors.

    With the vLLM back end (``config.backend``; :func:`umm.eval.backends.open_engine`) the live
    model is a vLLM engine: each candidate's merged tensors go into it in memory
    (``LiveMerge(sink=engine.load_weights)``), and ``model`` only describes the parameters."""

    def __init__(self, config: EvolveConfig, genome: Any, tasks: Sequence[Any], device: str) -> None:
        import torch

        from umm.checkpoints.loading import load_causal_lm, load_tokenizer, resolve_dtype
        from umm.eval.backends import open_engine, shape_model
        from umm.evolve.apply import LiveMerge

        self.config = config
        self.genome = genome
        self.tasks = list(tasks)
        self.device = device
        ref = config.base_model or config.models[0]
        self.engine = open_engine(ref, config.backend, device=device, dtype=config.dtype, seed=config.seed)
        if self.engine is None:
            self.model = load_causal_lm(ref, device=device, dtype=config.dtype)
        else:
            self.model = shape_model(ref, config.dtype)
        self.model.eval()
        self.tokenizer = load_tokenizer(ref)
        self.live = LiveMerge(
            genome.to_recipe(), self.model, device=device, cache_dtype=resolve_dtype(config.dtype) or torch.float32,
            sink=None if self.engine is None else self.engine.load_weights,
        )

    def evaluate(self, split: str) -> dict[str, TaskEval]:
        """Task name -> score and per-item correctness of the live model on ``split``."""
        model = self.model if self.engine is None else self.engine
        return evaluate_tasks(self.config, self.tasks, model, self.tokenizer, split, self.device)

    def score(self, x: np.ndarray) -> Scored:
        t0 = time.perf_counter()
        recipe = self.genome.with_vector(np.asarray(x)).to_recipe()
        apply_s = self.live.apply(recipe)
        scores = {k: v.score.score for k, v in self.evaluate("search").items()}
        return Scored(scores, objective(scores, task_weights(self.config)), time.perf_counter() - t0, apply_s)


@dataclass(frozen=True)
class TaskEval:
    """One task's result: the TaskScore and ``item id -> correct`` of every scored item."""

    score: Any
    correct: dict[str, bool]


def task_weights(config: EvolveConfig) -> dict[str, float]:
    return {t.name: t.weight for t in config.tasks}


def evaluate_tasks(
    config: EvolveConfig, tasks: Sequence[Any], model: Any, tokenizer: Any, split: str, device: Any
) -> dict[str, TaskEval]:
    """Score ``model`` on each task's seeded ``split`` subset (``search_size`` / ``test_size``)
    with :func:`umm.eval.evaluate`, as ``umm eval --split SPLIT --limit SIZE --seed SEED`` does.
    ``model``: a PyTorch model (decoded with the PyTorch side of ``config.backend``) or an engine."""
    from umm.eval import evaluate
    from umm.eval.backends import torch_backend

    out: dict[str, TaskEval] = {}
    for spec, task in zip(config.tasks, tasks):
        limit = spec.search_size if split == "search" else spec.test_size
        result = evaluate(
            model, tokenizer, [task], split=split, limit=limit, seed=config.seed,
            batch_size=config.batch_size, device=device, backend=torch_backend(config.backend),
        )
        out[spec.name] = TaskEval(result.scores[spec.name], {r.id: bool(r.correct) for r in result.samples[spec.name]})
    return out


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
    """``./runs/evolve-<config stem>-<optimizer>-seed<seed>`` under the current directory."""
    return Path.cwd() / "runs" / f"evolve-{Path(config_path).stem}-{config.optimizer}-seed{config.seed}"


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
    write_json_atomic(run_dir / CONFIG_FILE, json_safe(_config_record(config)))
    return None


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


def run_evolve(
    config: EvolveConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    on_generation: Callable[[SearchState, Generation, int], None] | None = None,
    on_progress: ProgressSink | None = None,
) -> EvolveResult:
    """Run a search and write its outputs into ``run_dir``:

    ``config.json``, ``references.json`` (each source's and untuned baseline's search-split
    objective, computed once), ``search_state.json`` (resume point) and ``history.jsonl`` (both
    rewritten after every generation), ``random/`` (the same two files for the random-search
    baseline, if listed in ``baselines`` and ``compare`` is on), then at the end ``fitness.png``, ``weights.png``,
    ``best_recipe.yaml`` (runs in ``umm merge`` and ``mergekit-yaml``), ``merged/`` (the merged
    model, if ``write_model``), ``comparison.md``/``.json`` (test split, if ``compare``).
    ``on_generation(state, generation, total_generations)`` reports the main search's progress;
    ``on_progress`` receives a bar of candidates per search (with the best fitness so far) and the
    final merge's bar.
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

    with contextlib.ExitStack() as stack:
        devices, workers, make_eval = _start_workers(config, genome, tasks, stack)
        return _search_and_report(config, run_dir, state, fresh, genome, tasks, transform, names, generations,
                                  devices, workers, make_eval, on_generation, on_progress)


def _start_workers(
    config: EvolveConfig, genome: Any, tasks: Sequence[Any], stack: contextlib.ExitStack
) -> tuple[list[str], list[Any], Callable[[Callable[[Scored], None]], EvaluateFn]]:
    """The devices and workers of a search, and its evaluator factory: one :class:`Worker` per
    device of this machine (:func:`make_evaluator`), or with ``config.ray`` the actors of a
    :class:`~umm.evolve.ray_pool.RayPool` (closed by ``stack``), the first one standing in as
    ``workers[0]`` and the driver's device (for the final merge) as ``devices[0]``."""
    if config.ray:
        from umm.evolve.ray_pool import RayPool

        pool = stack.enter_context(RayPool.start(config, genome, tasks))
        device = _driver_device(config)
        return [device], [pool.remote_worker(config, tasks, device)], pool.evaluator
    devices = devices_for(config)
    workers = [Worker(config, genome, tasks, devices[0])]
    if workers[0].engine is None:
        workers += [Worker(config, genome, tasks, d) for d in devices[1:]]
    elif len(devices) > 1:
        logger.info("backend %s: one engine, on %s; the other GPUs stay idle", workers[0].engine.name, devices[0])
    return devices, workers, lambda tick: make_evaluator(workers, tick)


def _driver_device(config: EvolveConfig) -> str:
    """This machine's device for the final merge in a Ray search: the config's if it is here, else CPU."""
    try:
        return devices_for(config)[0]
    except UmmError:
        return "cpu"


def _search_and_report(
    config: EvolveConfig, run_dir: Path, state: SearchState, fresh: SearchState, genome: Any, tasks: Sequence[Any],
    transform: BoxTransform, names: list[str], generations: int, devices: list[str], workers: Sequence[Any],
    make_eval: Callable[[Callable[[Scored], None]], EvaluateFn],
    on_generation: Callable[[SearchState, Generation, int], None] | None, on_progress: ProgressSink | None,
) -> EvolveResult:
    references = reference_objectives(config, workers[0], run_dir)
    search = _Search(transform, workers, names, generations, config.budget.seconds, on_progress, make_eval)

    t0 = time.perf_counter()
    search.run(state, run_dir, f"evolve ({config.optimizer})", on_generation)
    logger.info("search finished in %.1f s (this session)", time.perf_counter() - t0)
    random_state = None
    if config.compare and "random" in config.baselines and config.optimizer != "random":
        random_state = search.run(_random_state(run_dir / RANDOM_DIR, fresh), run_dir / RANDOM_DIR,
                                  "baseline (random search)", None)

    plot_fitness(state, run_dir / FITNESS_PNG, title=f"{config.optimizer} search, {config.method}",
                 references=references, random_state=random_state)
    best_recipe = _recipe_of(config, genome, state)
    recipe_path = run_dir / BEST_RECIPE
    write_text_atomic(recipe_path, best_recipe.to_yaml())
    _plot_best_weights(genome, state, run_dir)

    model_dir: Path | None = None
    if config.write_model:
        from umm.merge.disk import merge

        model_dir = run_dir / MODEL_DIR
        merge(best_recipe, model_dir, device=devices[0], overwrite=True, on_progress=on_progress)

    md = comparison = None
    if config.compare:
        random_recipe = _recipe_of(config, genome, random_state) if random_state is not None else None
        comparison = compare_on_test(config, workers[0], best_recipe, model_dir, random_recipe)
        md = write_comparison(run_dir, comparison)
    return EvolveResult(run_dir, state, recipe_path, model_dir, md, comparison, random_state)


def _recipe_of(config: EvolveConfig, genome: Any, state: SearchState) -> Any:
    """The recipe of the best candidate of ``state``."""
    best = state.best()
    assert best is not None
    return genome.with_vector(np.asarray(best.x)).to_recipe(**({"out_dtype": config.out_dtype} if config.out_dtype else {}))


def _plot_best_weights(genome: Any, state: SearchState, run_dir: Path) -> None:
    best = state.best()
    assert best is not None
    best_genome = genome.with_vector(np.asarray(best.x))
    shown = "weight" if "weight" in best_genome.param_names else best_genome.param_names[0]
    weights = layer_weights(best_genome, shown)
    if weights is not None:
        plot_weights(
            weights, [Path(str(m)).name for m in best_genome.models], run_dir / WEIGHTS_PNG,
            title=f"best genome: per-layer {shown} per model",
        )


def _random_state(folder: Path, main: SearchState) -> SearchState:
    """The random-search baseline's state: the one saved in ``folder``, else a fresh one with the
    main search's seed, population, dimension and starting point."""
    if (folder / STATE_FILE).exists():
        saved = load_state(folder)
        if saved.optimizer == "random" and saved.settings() == _random_settings(main).settings():
            return saved
        raise ResumeError(f"cannot resume {folder}: its search settings differ from the config's")
    folder.mkdir(parents=True, exist_ok=True)
    return _random_settings(main)


def _random_settings(main: SearchState) -> SearchState:
    return SearchState(optimizer="random", seed=main.seed, dimension=main.dimension, population=main.population,
                       sigma0=main.sigma0, z0=list(main.z0))


@dataclass
class _Search:
    """Runs (or resumes) one search with the shared workers, saving into its own folder."""

    transform: BoxTransform
    workers: Sequence[Worker]
    names: list[str]
    generations: int
    max_seconds: float | None
    on_progress: ProgressSink | None
    #: ``make_eval(on_candidate)``: the evaluator of a generation (default: :func:`make_evaluator`)
    make_eval: Callable[[Callable[[Scored], None]], EvaluateFn] | None = None

    def run(
        self, state: SearchState, folder: Path, label: str,
        on_generation: Callable[[SearchState, Generation, int], None] | None,
    ) -> SearchState:
        total = 1 + self.generations * state.population
        bar = open_bar(self.on_progress, total, label, "candidate")
        bar.advance(min(total, state.evaluations))
        best_seen = [max((c.fitness for g in state.generations for c in g.candidates), default=-math.inf)]

        def tick(r: Scored) -> None:
            if math.isfinite(r.fitness):
                best_seen[0] = max(best_seen[0], r.fitness)
            bar.advance(1, best=f"{best_seen[0]:.4f}", s_per_candidate=f"{r.seconds:.2f}")

        def save(s: SearchState) -> None:
            save_state(folder, s)
            write_history(folder, s, self.names)

        def progress(s: SearchState, g: Generation) -> None:
            if on_generation is not None:
                on_generation(s, g, self.generations)

        try:
            run_search(
                state, self.transform, (self.make_eval or (lambda t: make_evaluator(self.workers, t)))(tick), generations=self.generations,
                max_seconds=self.max_seconds, save=save, on_generation=progress,
            )
        finally:
            bar.close()
        return state


#: the "untuned" merges of the final table: textbook settings, never tuned on any split
UNTUNED = {
    "task_arithmetic": {"weight": 1.0},  # base + sum of task vectors (every weight 1: "1/1")
    "ties": {"weight": 1.0},  # density left at the method's default, 1.0, as mergekit's default
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


def untuned_baselines(config: EvolveConfig) -> list[str]:
    """The untuned merges of ``config.baselines`` that can be built (they need a base model)."""
    wanted = [b for b in config.baselines if b in UNTUNED]
    if wanted and config.base_model is None:
        logger.info("no base_model: the untuned %s rows are left out", " and ".join(wanted))
        return []
    return wanted


def source_name(path: str) -> str:
    return f"source: {Path(path).name}"


def untuned_name(method: str) -> str:
    return f"untuned {method}"


def reference_objectives(config: EvolveConfig, worker: Worker, run_dir: Path) -> list[Reference]:
    """Each source's and each untuned baseline's scores on the search items (the fitness's items).

    Read from ``references.json`` when a previous session of this run stored them; the missing
    ones are computed and the file rewritten. Leaves the worker's live model in an unspecified
    state (every candidate is applied in full anyway).
    """
    stored = load_references(run_dir)
    weights = task_weights(config)
    wanted: list[tuple[str, str, Callable[[], None]]] = []
    for i, path in enumerate(worker.live.model_paths):
        if i != worker.live.base_index:
            wanted.append((source_name(path), "source", lambda i=i: worker.live.load_source(i)))
    for method in untuned_baselines(config):
        wanted.append((untuned_name(method), "baseline", lambda m=method: worker.live.apply(untuned_recipe(config, m))))
    rows = []
    for name, kind, load in wanted:
        if name not in stored:
            load()
            scores = {k: v.score.score for k, v in worker.evaluate("search").items()}
            stored[name] = Reference(name=name, kind=kind, scores=scores, objective=objective(scores, weights))
        rows.append(stored[name])
    save_references(run_dir, rows)
    return rows


def compare_on_test(
    config: EvolveConfig,
    worker: Worker,
    best_recipe: Any,
    model_dir: Path | None = None,
    random_recipe: Any = None,
) -> Comparison:
    """The final table on ``test``: the evolved merge, each source, the base and the baselines.

    The evolved row is scored from ``model_dir`` (the merged model written to disk) when there is
    one, loaded as ``umm eval`` loads it, so its scores are what ``umm eval model_dir --split test``
    gives; otherwise from the live model. The other rows are applied to the live model.
    """
    weights = task_weights(config)
    rows: list[ComparisonRow] = []
    correct: dict[str, dict[str, dict[str, bool]]] = {}

    def add(name: str, kind: str, results: dict[str, TaskEval], path: str | None = None) -> None:
        scores = {k: float(v.score.score) for k, v in results.items()}
        rows.append(ComparisonRow(
            name=name, kind=kind, scores=scores, objective=objective(scores, weights),
            n={k: int(v.score.n) for k, v in results.items()},
            ci={k: (float(v.score.ci_low), float(v.score.ci_high)) for k, v in results.items()}, path=path,
        ))
        correct[name] = {k: v.correct for k, v in results.items()}

    evolved = f"evolved ({config.optimizer}, {config.method})"
    if model_dir is not None:
        add(evolved, "evolved", _evaluate_folder(config, worker, model_dir), str(model_dir))
    else:
        worker.live.apply(best_recipe)
        add(evolved, "evolved", worker.evaluate("test"))
    for i, path in enumerate(worker.live.model_paths):
        worker.live.load_source(i)
        if i == worker.live.base_index:
            add(f"base: {Path(path).name}", "baseline", worker.evaluate("test"), str(path))
        else:
            add(source_name(path), "source", worker.evaluate("test"), str(path))
    for method in untuned_baselines(config):
        worker.live.apply(untuned_recipe(config, method))
        add(untuned_name(method), "baseline", worker.evaluate("test"))
    if random_recipe is not None:
        worker.live.apply(random_recipe)
        add("random search (same budget)", "baseline", worker.evaluate("test"))

    best = max((r for r in rows if r.kind == "source"), key=lambda r: r.objective)
    diff = paired_difference(correct[evolved], correct[best.name], weights)
    return Comparison(
        weights=weights, rows=rows, best_source=best.name, evolved_minus_best_source=diff,
        resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
        eval_commands=eval_commands(config, model_dir, worker.engine) if model_dir is not None else [],
    )


def paired_difference(
    a: dict[str, dict[str, bool]], b: dict[str, dict[str, bool]], weights: dict[str, float]
) -> PairedDifference:
    """:func:`~umm.eval.stats.paired_bootstrap_difference` of ``a - b``, items paired by id."""
    for task in weights:
        if set(a[task]) != set(b[task]):
            raise RuntimeError(f"task {task}: the two models were scored on different test items")
    ids = {task: sorted(a[task]) for task in weights}
    return paired_bootstrap_difference(
        {t: [float(a[t][i]) for i in ids[t]] for t in weights},
        {t: [float(b[t][i]) for i in ids[t]] for t in weights},
        weights, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
    )


def _evaluate_folder(config: EvolveConfig, worker: Worker, folder: Path) -> dict[str, TaskEval]:
    """Test scores of the model in ``folder``, loaded as ``umm eval`` loads it (its own dtype);
    with an engine, the folder's tensors are loaded into it (as ``umm eval --backend vllm
    --dtype DTYPE``), so every row of the table comes from the same back end."""
    from umm.checkpoints.loading import load_causal_lm, load_tokenizer

    if worker.engine is not None:
        from umm.checkpoints.reader import Checkpoint

        with Checkpoint.open(folder) as ckpt:
            worker.engine.load_weights((name, ckpt.get_tensor(name)) for name in worker.live.tensor_names)
        return evaluate_tasks(config, worker.tasks, worker.engine, worker.tokenizer, "test", worker.device)
    model = load_causal_lm(folder, device=worker.device, dtype="auto")
    try:
        return evaluate_tasks(config, worker.tasks, model, load_tokenizer(folder), "test", worker.device)
    finally:
        del model


def eval_commands(config: EvolveConfig, folder: Path, engine: Any = None) -> list[str]:
    """``umm eval`` commands that score ``folder`` on the same test items (one per test size),
    with the search's generation ``engine`` if it had one."""
    by_size: dict[int | None, list[str]] = {}
    for t in config.tasks:
        by_size.setdefault(t.test_size, []).append(t.name)
    via = f" --backend {engine.name} --dtype {config.dtype}" if engine is not None else ""
    return [
        f"umm eval {folder} --task {','.join(names)} --split test --seed {config.seed} "
        f"--batch-size {config.batch_size}" + (f" --limit {size}" if size is not None else "") + via
        for size, names in by_size.items()
    ]
