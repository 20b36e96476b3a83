"""``umm combine``: fuse the sources of other families into the pivot, evolve the pivot's family,
compare on ``test``, and publish only an improvement.

Stages (reported through :class:`CombineEvents`; the library prints nothing):

1. **check**: every model folder (inputs, ``base_model``, ``previous``) loads as a causal LM
   config and a tokenizer; their fingerprints make :class:`~umm.combine.plan.ModelInfo`.
2. **pivot**: ``config.pivot``, else the best model of the hardest domain on ``search``
   (:func:`umm.fusion.pipeline.pivot_by_search`); then the plan (:func:`~umm.combine.plan.plan_combine`).
3. **fuse**: each source of another family fused pairwise into the pivot with
   :func:`umm.fusion.pipeline.run_fuse` into ``fused/<source>/``; a source whose vocabulary
   coverage is below ``fusion.min_vocab_coverage`` or whose fusion fails is dropped, with its reason.
4. **evolve**: :func:`umm.evolve.run.run_evolve` over the pivot's family and the fused models, in
   ``evolve/``; its merged model becomes ``model/``.
5. **compare**: the merged model, every input model and ``previous`` scored on the same ``test``
   items (:func:`umm.eval.evaluate_folder`); ``comparison.json`` / ``comparison.md``.
6. **decide**: :func:`umm.combine.decision.decide`; ``combine.json`` and the model card
   ``model/README.md``.

Every finished stage leaves a typed JSON file in the run folder that ``resume=True`` reads back
instead of doing the work again; a fusion in progress resumes from its checkpoints and the
search from its own state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from umm.atomic import atomic_path, write_json_atomic, write_text_atomic
from umm.combine.config import CombineConfig, CombineConfigError
from umm.combine.decision import Correctness, Decision, decide
from umm.combine.plan import CombinePlan, ModelInfo, plan_combine
from umm.errors import UmmError
from umm.evolve.report import Comparison, ComparisonRow, objective
from umm.progress import ProgressSink

if TYPE_CHECKING:
    from umm.eval.evaluate import EvalResult
    from umm.evolve.config import EvolveConfig
    from umm.fusion.pipeline import Stage

logger = logging.getLogger(__name__)

#: ``scorer(model folder, tasks, split, limit) -> EvalResult`` (scores and per-item samples)
Scorer = Callable[[Path, Sequence[str], str, "int | None"], "EvalResult"]

#: the stages of a run, in order (the ``name`` of :meth:`CombineEvents.stage`)
STAGES = ("check", "pivot", "fuse", "evolve", "compare", "decide")

CONFIG_FILE = "combine_config.json"
PIVOT_FILE = "pivot.json"
PLAN_FILE = "plan.json"
FUSED_DIR = "fused"
TEACHERS_DIR = "teachers"
EVOLVE_DIR = "evolve"
EVOLVE_FILE = "evolve.json"
SCORES_DIR = "scores"
MODEL_DIR = "model"
RESULT_FILE = "combine.json"
CARD_FILE = "README.md"
#: config keys that may change between a run and its resume (they change no stage's result)
RESUMABLE_CHANGES = frozenset({"device", "margin"})


class CombineError(UmmError):
    """A combination cannot go on (bad run folder, nothing left to merge, ...)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Dropped(_Frozen):
    """A fusion source left out of the merge, and why."""

    source: str
    reason: str


class CombineResult(_Frozen):
    """What a run produced (``combine.json``): the merged model, the plan, the fused and dropped
    sources, the best recipe's sha256 and method, the test comparison and the decision."""

    run_dir: Path
    model_dir: Path
    plan: CombinePlan
    fused: dict[str, str]  # source path -> fused model folder
    dropped: list[Dropped]
    recipe_hash: str
    method: str
    comparison: Comparison
    decision: Decision


class CombineEvents(Protocol):
    """Receives a combination's progress. Every method does nothing: subclass and override what
    you show (``umm combine`` renders them all on the console)."""

    def stage(self, name: str, detail: str) -> None:
        """A stage begins (``check``, ``pivot``, ``fuse``, ``evolve``, ``compare``, ``decide``)."""

    def note(self, text: str) -> None:
        """A plain progress message (what was read, chosen, reused or written)."""

    def warning(self, text: str) -> None:
        """Something the user should know (e.g. a stage's result read back on resume differs)."""

    def dropped(self, dropped: Dropped) -> None:
        """A fusion source was dropped."""

    def result(self, result: CombineResult) -> None:
        """The run is finished."""


class _Quiet(CombineEvents):
    """The default: a run that shows nothing."""


# --------------------------------------------------------------------------- what each stage leaves


class PivotChoice(_Frozen):
    """``pivot.json``: the pivot, and how it was chosen (with the search-split domain scores)."""

    pivot: str
    chosen_by: Literal["config", "search"]
    domain: str | None = None
    search_scores: dict[str, dict[str, float]] = {}


class FusionOutcome(_Frozen):
    """``fused/<source>.json``: one pairwise fusion's fused folder, or why the source was dropped."""

    source: str
    output: str | None = None
    coverage: float | None = None
    dropped: str | None = None


class EvolveOutcome(_Frozen):
    """``evolve.json``: the evolve stage's merged model, best recipe (and its sha256), method,
    best search fitness, and what was merged onto which base."""

    model_dir: str
    recipe: str
    recipe_hash: str
    method: str
    best_fitness: float
    models: list[str]
    base: str


class TaskItems(_Frozen):
    """One task's test result: the score with its 95% interval, and ``item id -> correct``."""

    score: float
    ci_low: float
    ci_high: float
    n: int
    correct: dict[str, bool]


class ModelTestScores(_Frozen):
    """``scores/<row>.json``: one model's test results per task."""

    name: str
    path: str
    tasks: dict[str, TaskItems]


_M = TypeVar("_M", bound=BaseModel)


def _read(path: Path, model: type[_M], events: CombineEvents) -> _M | None:
    """The typed record in ``path``; ``None`` when missing, or unreadable (then the stage reruns)."""
    if not path.is_file():
        return None
    try:
        return model.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        events.warning(f"{path} is unreadable ({exc.__class__.__name__}); doing that step again")
        return None


def _write(path: Path, record: BaseModel) -> None:
    write_json_atomic(path, json.loads(record.model_dump_json()), indent=1)


# --------------------------------------------------------------------------- the pipeline


def run_combine(
    config: CombineConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    events: CombineEvents | None = None,
    on_progress: ProgressSink | None = None,
    scorer: Scorer | None = None,
) -> CombineResult:
    """Run every stage (see the module docstring) into ``run_dir``; ``resume`` continues a run
    there, reusing each finished stage. ``scorer`` replaces the evaluation of the pivot choice and
    of the comparison (default: :func:`make_scorer`). ``on_progress`` receives the bars of the
    evaluations, teacher passes, fusion and search. Returns the :class:`CombineResult` also written
    to ``combine.json``."""
    events = events or _Quiet()
    run_dir = Path(run_dir).absolute()
    scorer = scorer or make_scorer(config, on_progress)
    prepare_run_dir(run_dir, config, resume)

    events.stage("check", f"{len(config.models)} models")
    infos, base, previous = check_inputs(config)
    for m in infos:
        events.note(f"{m.name}: family {family_label(m)} ({m.path})")

    events.stage("pivot", "from the config" if config.pivot else "best on the hardest domain, search split")
    choice = pivot_stage(config, run_dir, scorer, events)
    plan = plan_combine(infos, choice.pivot, base, previous)
    stored = _read(run_dir / PLAN_FILE, CombinePlan, events)
    if stored is not None and stored != plan:
        raise CombineError(f"cannot resume {run_dir}: the models' plan differs from the one it was started with "
                           f"(now {plan.model_dump()}, then {stored.model_dump()})")
    _write(run_dir / PLAN_FILE, plan)
    events.note(plan_text(plan, infos))

    fused: dict[str, str] = {}
    dropped: list[Dropped] = []
    if "fuse" in plan.stages:
        events.stage("fuse", f"{len(plan.fuse)} source(s) into {Path(plan.pivot).name}, pairwise")
        fused, dropped = fusion_stage(config, plan, infos, run_dir, events, on_progress)

    events.stage("evolve", f"{config.evolve.method}, {config.evolve.optimizer}")
    outcome = evolve_stage(config, plan, list(fused.values()), run_dir, events, on_progress, scorer)

    events.stage("compare", "test split: the merged model, every input model" + (", previous" if previous else ""))
    rows = compare_stage(config, infos, previous, Path(outcome.model_dir), run_dir, scorer, events, plan.pivot)

    events.stage("decide", f"margin {config.margin:g}")
    result = finish(config, run_dir, plan, fused, dropped, outcome, rows, infos, previous)
    events.result(result)
    return result


def make_scorer(config: CombineConfig, on_progress: ProgressSink | None = None) -> Scorer:
    """The default scorer: :func:`umm.eval.evaluate_folder` with the config's seed, eval batch
    size, device and ``max_new_tokens``; its bars go to ``on_progress``."""

    def score(path: Path, tasks: Sequence[str], split: str, limit: int | None) -> EvalResult:
        from umm.eval import evaluate_folder

        return evaluate_folder(path, list(tasks), split=split, limit=limit, seed=config.seed,  # type: ignore[arg-type]
                               batch_size=config.eval_batch_size, device=config.device,
                               max_new_tokens=config.max_new_tokens, on_progress=on_progress)

    return score


def prepare_run_dir(run_dir: Path, config: CombineConfig, resume: bool) -> None:
    """Create ``run_dir`` and record the config; on ``resume``, check it is the run's own config
    (only :data:`RESUMABLE_CHANGES` may differ). A non-empty folder needs ``resume``."""
    now = json.loads(config.model_dump_json())
    path = run_dir / CONFIG_FILE
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CombineError(f"cannot resume {run_dir}: its {CONFIG_FILE} is unreadable ({exc})") from None
        diff = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if diff:
            raise CombineError(f"cannot resume {run_dir}: the config differs from the one it was started with in "
                               f"{', '.join(diff)} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")
    elif not resume and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise CombineError(f"{run_dir} already holds a run; continue it with --resume or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, now, indent=1)


# --------------------------------------------------------------------------- stages 1-2


def model_info(path: str, role: str, name: str | None = None) -> ModelInfo:
    """Check that ``path`` holds a causal LM config and a tokenizer; its :class:`ModelInfo`."""
    from umm.checkpoints.errors import CheckpointError
    from umm.checkpoints.fingerprint import architecture_fingerprint, tokenizer_fingerprint
    from umm.checkpoints.loading import check_model_config, load_tokenizer
    from umm.checkpoints.reader import Checkpoint

    try:
        with Checkpoint.open(path) as ckpt:
            check_model_config(ckpt.config, ckpt.path / "config.json")
            architecture = architecture_fingerprint(ckpt)
        load_tokenizer(path)
        tokenizer = tokenizer_fingerprint(path)
    except CheckpointError as exc:
        raise UmmError(f"{role} {path}: {exc}") from None
    if tokenizer is None:
        raise UmmError(f"{role} {path}: has no tokenizer vocabulary (tokenizer.json, vocab.json or vocab.txt)")
    return ModelInfo(path=str(path), name=name or Path(path).name, architecture=architecture, tokenizer=tokenizer)


def check_inputs(config: CombineConfig) -> tuple[list[ModelInfo], ModelInfo | None, ModelInfo | None]:
    """Stage 1: the :class:`ModelInfo` of every model (unique names: ``name``, ``name-2``...), of
    the base model and of the previous model."""
    infos: list[ModelInfo] = []
    taken: set[str] = set()
    for path in config.models:
        name = stem = Path(path).name
        k = 2
        while name in taken:
            name, k = f"{stem}-{k}", k + 1
        taken.add(name)
        infos.append(model_info(path, "model", name))
    base = model_info(config.base_model, "base_model") if config.base_model else None
    previous = model_info(config.previous, "previous") if config.previous else None
    return infos, base, previous


def family_label(m: ModelInfo) -> str:
    """A short label of a model's family: the first 8 hex digits of both fingerprints."""
    return f"{m.architecture[:8]}/{m.tokenizer[:8]}"


def pivot_stage(config: CombineConfig, run_dir: Path, scorer: Scorer, events: CombineEvents) -> PivotChoice:
    """Stage 2: the configured pivot, the stored choice of a resumed run, or the best model of the
    hardest domain (``pivot_domain``: that domain) on the ``search`` split
    (:func:`umm.fusion.pipeline.pivot_by_search`); written to ``pivot.json``."""
    from umm.fusion.pipeline import pivot_by_search

    if config.pivot is not None:
        pivot = next(m for m in config.models if Path(m).resolve() == Path(config.pivot).resolve())
        choice = PivotChoice(pivot=pivot, chosen_by="config")
    else:
        stored = _read(run_dir / PIVOT_FILE, PivotChoice, events)
        if stored is not None and stored.chosen_by == "search" and stored.pivot in config.models:
            events.note(f"pivot {Path(stored.pivot).name} (chosen on {stored.domain} by the run's earlier session)")
            return stored
        names = [t.name for t in config.tasks]

        def score(path: Path) -> dict[str, tuple[float, float, float, int]]:
            res = score_tasks(config, scorer, path, "search")
            return {t: (r.score, r.ci_low, r.ci_high, r.n) for t, r in res.items()}

        path, scores, domain = pivot_by_search([Path(m) for m in config.models], names, score, events.note,
                                               pivot_domain=config.pivot_domain)
        choice = PivotChoice(pivot=str(path), chosen_by="search", domain=domain, search_scores=scores)
    _write(run_dir / PIVOT_FILE, choice)
    events.note(f"pivot {Path(choice.pivot).name}" + (f" (best on {choice.domain})" if choice.domain else " (from the config)"))
    return choice


def score_tasks(config: CombineConfig, scorer: Scorer, path: Path, split: str) -> dict[str, TaskItems]:
    """Every task of ``config`` scored on ``split`` (each task's ``search_size`` / ``test_size``
    items, seeded by ``config.seed``; one scorer call per distinct size)."""
    by_limit: dict[int | None, list[str]] = {}
    for t in config.tasks:
        by_limit.setdefault(t.search_size if split == "search" else t.test_size, []).append(t.name)
    out: dict[str, TaskItems] = {}
    for limit, names in by_limit.items():
        res = scorer(path, names, split, limit)
        for name in names:
            s = res.scores[name]
            out[name] = TaskItems(score=s.score, ci_low=s.ci_low, ci_high=s.ci_high, n=s.n,
                                  correct={r.id: bool(r.correct) for r in res.samples[name]})
    return {t.name: out[t.name] for t in config.tasks}


def plan_text(plan: CombinePlan, infos: Sequence[ModelInfo]) -> str:
    """The plan in one sentence."""
    names = {m.path: m.name for m in infos}

    def name(p: str) -> str:
        return names.get(p, Path(p).name)

    text = f"plan: {' then '.join(plan.stages)}; pivot {name(plan.pivot)}, base {name(plan.base)}"
    if plan.fuse:
        text += f"; fuse pairwise into the pivot: {', '.join(name(p) for p in plan.fuse)}"
    return text + f"; merge: {', '.join(name(p) for p in plan.family) or '(only fused models)'}"


# --------------------------------------------------------------------------- stage 3: fuse


def fusion_stage(
    config: CombineConfig, plan: CombinePlan, infos: Sequence[ModelInfo], run_dir: Path,
    events: CombineEvents, on_progress: ProgressSink | None,
) -> tuple[dict[str, str], list[Dropped]]:
    """Stage 3: fuse each source of ``plan.fuse`` pairwise into the pivot (:func:`fuse_one`).
    Returns (source path -> fused folder, the dropped sources)."""
    if config.fusion.data is None:
        raise CombineConfigError("fusion.data is not set: it is needed to fuse "
                                 f"{', '.join(Path(p).name for p in plan.fuse)} into the pivot {Path(plan.pivot).name} "
                                 "(an instruction-response JSONL file)")
    names = {m.path: m.name for m in infos}
    fused: dict[str, str] = {}
    dropped: list[Dropped] = []
    for source in plan.fuse:
        outcome = fuse_one(config, plan.pivot, source, names[source], run_dir, events, on_progress)
        if outcome.output is not None:
            fused[source] = outcome.output
        else:
            d = Dropped(source=source, reason=outcome.dropped or "unknown")
            dropped.append(d)
            events.dropped(d)
    return fused, dropped


def fuse_one(
    config: CombineConfig, pivot: str, source: str, name: str, run_dir: Path,
    events: CombineEvents, on_progress: ProgressSink | None,
) -> FusionOutcome:
    """Fuse ``source`` alone into ``pivot`` into ``fused/<name>/`` with
    :func:`umm.fusion.pipeline.run_fuse` (no evaluation; a fusion in progress resumes from its
    checkpoints), after checking the vocabulary coverage
    (:func:`umm.fusion.align.vocab_coverage` >= ``fusion.min_vocab_coverage``). A failure (bad
    data, low coverage, a fusion error) drops the source: the outcome says why. Recorded in
    ``fused/<name>.json``; a recorded outcome is reused."""
    from umm.checkpoints.loading import load_tokenizer
    from umm.fusion.align import vocab_coverage
    from umm.fusion.pipeline import FuseConfig, output_is_complete, run_fuse

    record = run_dir / FUSED_DIR / f"{name}.json"
    output = run_dir / FUSED_DIR / name
    stored = _read(record, FusionOutcome, events)
    if stored is not None and stored.source == source and (stored.output is None or output_is_complete(output)):
        events.note(f"{name}: " + (f"fused model {stored.output} (done earlier)" if stored.output
                                   else f"dropped earlier: {stored.dropped}"))
        return stored
    settings = config.fusion
    coverage = vocab_coverage(load_tokenizer(source), load_tokenizer(pivot))
    if coverage < settings.min_vocab_coverage:
        outcome = FusionOutcome(source=source, coverage=coverage, dropped=(
            f"vocabulary coverage {coverage:.3f} (the fraction of its tokens found exactly in the pivot's "
            f"vocabulary) is below fusion.min_vocab_coverage {settings.min_vocab_coverage:g}"))
    else:
        fcfg = FuseConfig.model_validate({
            **settings.model_dump(exclude={"min_vocab_coverage"}),
            "teacher_cache": settings.teacher_cache or run_dir / TEACHERS_DIR,
            "pivot": Path(pivot), "sources": [Path(source)], "output": output,
            "eval": {"tasks": [t.name for t in config.tasks], "seed": config.seed, "batch_size": config.eval_batch_size},
            "final_eval": False, "device": config.device,
        })
        events.note(f"{name}: vocabulary coverage {coverage:.3f}; fusing into {Path(pivot).name}")
        try:
            run_fuse(fcfg, resume=True, on_progress=on_progress, events=_FuseNotes(name, events))
        except (UmmError, ValueError, RuntimeError, OSError) as exc:
            logger.warning("fusion of %s failed", source, exc_info=True)
            outcome = FusionOutcome(source=source, coverage=coverage, dropped=f"fusion failed: {exc}")
        else:
            outcome = FusionOutcome(source=source, coverage=coverage, output=str(output))
    _write(record, outcome)
    return outcome


class _FuseNotes:
    """A :class:`umm.fusion.pipeline.FuseEvents` that forwards one fusion's stages, notes and
    warnings as the combination's notes, prefixed with the source's name."""

    def __init__(self, name: str, events: CombineEvents) -> None:
        self.name = name
        self.events = events

    def stage(self, stage: Stage) -> None:
        self.events.note(f"{self.name}: {stage.title}")

    def note(self, text: str) -> None:
        self.events.note(f"{self.name}: {text}")

    def warning(self, text: str) -> None:
        self.events.warning(f"{self.name}: {text}")

    def candidates_scored(self, *args: object) -> None:
        """The pivot is always given: nothing is scored."""

    def teacher_passes(self, teachers: Sequence[object], cfg: object) -> None:
        self.events.note(f"{self.name}: teacher passes of " + ", ".join(str(getattr(t, "name", t)) for t in teachers)
                         + " done (cached in the run's teacher cache)")

    def training_step(self, report: object) -> None:
        """Steps are shown by the progress bars."""

    def results(self, *args: object) -> None:
        """No final evaluation in a combination's fusion."""


# --------------------------------------------------------------------------- stage 4: evolve


def evolve_config(config: CombineConfig, models: Sequence[str], base: str) -> EvolveConfig:
    """The :class:`~umm.evolve.config.EvolveConfig` of the evolve stage: the config's ``evolve``
    settings, tasks, seed and device; no final table of its own (``compare=False``, no baselines)."""
    from umm.evolve.config import EvolveConfig

    return EvolveConfig.model_validate({
        **config.evolve.model_dump(), "models": list(models), "base_model": base,
        "tasks": [t.model_dump() for t in config.tasks], "seed": config.seed, "device": config.device,
        "write_model": True, "compare": False, "baselines": [],
    })


#: where the search starts, in each weight's bounds: the best single model near the top, the others near the bottom
START_HIGH, START_LOW = 0.9, 0.1
START_FILE = "start.yaml"


def start_recipe(config: CombineConfig, models: Sequence[str], base: str, scorer: Scorer, folder: Path) -> str:
    """The search's starting recipe (``evolve/start.yaml``): with a ``weight`` parameter, the model
    with the best ``search`` objective (each scored once) at ``START_HIGH`` of
    its weight's bounds and every other at ``START_LOW``, so the search starts near the best model
    it can merge (a fused model is often it: an even start dilutes the fusion's delta and loses its
    skill) and grows the others' share from there; other methods: ``uniform``."""
    import numpy as np

    from umm.checkpoints.reader import Checkpoint
    from umm.evolve.run import start_genome

    ecfg = evolve_config(config, models, base)
    with Checkpoint.open(base) as ref:
        genome = start_genome(ecfg, ref.num_layers or 0)
    if "weight" not in genome.param_names or len(models) < 2:
        return "uniform"
    weights = {t.name: t.weight for t in config.tasks}
    objectives = [objective({t: r.score for t, r in score_tasks(config, scorer, Path(m), "search").items()}, weights)
                  for m in models]
    best = int(np.argmax(objectives))
    lo, hi = ecfg.bounds_for("weight")
    values = np.array(genome.values, dtype=np.float64)
    k = genome.param_names.index("weight")
    values[:, :, ..., k] = lo + START_LOW * (hi - lo)
    values[:, best, ..., k] = lo + START_HIGH * (hi - lo)
    path = folder / START_FILE
    write_text_atomic(path, genome.with_vector(values.reshape(-1)).to_recipe().to_yaml())
    return str(path)


def evolve_stage(
    config: CombineConfig, plan: CombinePlan, fused: Sequence[str], run_dir: Path,
    events: CombineEvents, on_progress: ProgressSink | None, scorer: Scorer,
) -> EvolveOutcome:
    """Stage 4: :func:`umm.evolve.run.run_evolve` over the pivot's family and the fused models
    onto ``plan.base``, from :func:`start_recipe`, in ``evolve/`` (resumed from its state when there
    is one); its merged model is moved to ``model/``, its plots copied into the run folder.
    Recorded in ``evolve.json``."""
    from umm.evolve.run import MODEL_DIR as EVOLVE_MODEL_DIR
    from umm.evolve.run import run_evolve
    from umm.evolve.state import STATE_FILE

    models = [*plan.family, *fused]
    stored = _read(run_dir / EVOLVE_FILE, EvolveOutcome, events)
    if stored is not None and stored.models == models and (Path(stored.model_dir) / "config.json").is_file():
        events.note(f"merged model {stored.model_dir} (evolved earlier, best fitness {stored.best_fitness:.4f})")
        return stored
    if not models:
        raise CombineError(f"nothing left to merge onto {Path(plan.base).name}: every fusion source was dropped "
                           f"(see {run_dir / FUSED_DIR})")
    folder = run_dir / EVOLVE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    start = str(folder / START_FILE) if (folder / STATE_FILE).is_file() and (folder / START_FILE).is_file() \
        else start_recipe(config, models, plan.base, scorer, folder)
    ecfg = evolve_config(config, models, plan.base).model_copy(update={"start": start})

    def show(state, gen, total) -> None:  # type: ignore[no-untyped-def]
        best = state.best()
        events.note(f"generation {gen.index}/{total}: best so far {best.fitness:.4f}, evaluations {state.evaluations}")

    result = run_evolve(ecfg, folder, resume=(folder / STATE_FILE).is_file(), on_generation=show,
                        on_progress=on_progress)
    model_dir = run_dir / MODEL_DIR
    if model_dir.exists():
        shutil.rmtree(model_dir)
    os.replace(folder / EVOLVE_MODEL_DIR, model_dir)
    for png in ("fitness.png", "weights.png"):
        if (folder / png).is_file():
            with atomic_path(run_dir / png) as tmp:
                shutil.copyfile(folder / png, tmp)
    best = result.state.best()
    assert best is not None
    outcome = EvolveOutcome(
        model_dir=str(model_dir), recipe=str(result.best_recipe),
        recipe_hash=hashlib.sha256(result.best_recipe.read_bytes()).hexdigest(), method=ecfg.method,
        best_fitness=float(best.fitness), models=models, base=plan.base,
    )
    _write(run_dir / EVOLVE_FILE, outcome)
    events.note(f"merged model written to {model_dir} (best search fitness {best.fitness:.4f})")
    return outcome


# --------------------------------------------------------------------------- stages 5-6


class _Row(_Frozen):
    """A model of the comparison: its row name, kind, family label and test results."""

    name: str
    kind: Literal["evolved", "source", "previous"]
    family: str | None
    scores: ModelTestScores


def compare_stage(
    config: CombineConfig, infos: Sequence[ModelInfo], previous: ModelInfo | None, model_dir: Path,
    run_dir: Path, scorer: Scorer, events: CombineEvents, pivot: str,
) -> list[_Row]:
    """Stage 5: the merged model (of the ``pivot``'s family), every input model and ``previous``
    scored on the same ``test`` items (:func:`score_tasks`); each model's results are kept in
    ``scores/`` and reused."""
    pivot_info = next((m for m in infos if m.path == pivot), None)
    wanted: list[tuple[str, Literal["evolved", "source", "previous"], ModelInfo | None, str]] = [
        ("merged", "evolved", pivot_info, str(model_dir))]
    wanted += [(m.name, "source", m, m.path) for m in infos]
    if previous is not None:
        wanted.append((f"previous: {previous.name}", "previous", previous, previous.path))
    rows = []
    for i, (name, kind, info, path) in enumerate(wanted):
        record = run_dir / SCORES_DIR / f"{i:02d}-{kind}.json"
        stored = _read(record, ModelTestScores, events)
        if stored is not None and stored.name == name and stored.path == path:
            scores = stored
            events.note(f"{name}: test scores from the run's earlier session")
        else:
            events.note(f"scoring {name} on the test split")
            scores = ModelTestScores(name=name, path=path, tasks=score_tasks(config, scorer, Path(path), "test"))
            _write(record, scores)
        rows.append(_Row(name=name, kind=kind, family=family_label(info) if info else None, scores=scores))
    return rows


def _correct(row: _Row) -> Correctness:
    return {t: r.correct for t, r in row.scores.tasks.items()}


def finish(
    config: CombineConfig, run_dir: Path, plan: CombinePlan, fused: dict[str, str], dropped: list[Dropped],
    outcome: EvolveOutcome, rows: Sequence[_Row], infos: Sequence[ModelInfo], previous: ModelInfo | None,
) -> CombineResult:
    """Stage 6: the decision (:func:`umm.combine.decision.decide`), ``comparison.json`` /
    ``comparison.md``, the model card ``model/README.md`` and ``combine.json``."""
    from umm.evolve.report import write_comparison
    from umm.evolve.run import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

    weights = {t.name: t.weight for t in config.tasks}
    merged = next(r for r in rows if r.kind == "evolved")
    prev = next((r for r in rows if r.kind == "previous"), None)
    decision = decide(_correct(merged), {r.name: _correct(r) for r in rows if r.kind == "source"}, weights,
                      previous=_correct(prev) if prev else None, previous_name=prev.name if prev else None,
                      margin=config.margin)
    table_rows = []
    for r in rows:
        scores = {t: x.score for t, x in r.scores.tasks.items()}
        table_rows.append(ComparisonRow(
            name=r.name, kind=r.kind, scores=scores, objective=objective(scores, weights),
            n={t: x.n for t, x in r.scores.tasks.items()}, ci={t: (x.ci_low, x.ci_high) for t, x in r.scores.tasks.items()},
            path=r.scores.path, family=r.family,
        ))
    comparison = Comparison(
        weights=weights, rows=table_rows, best_source=decision.best_source,
        evolved_minus_best_source=decision.diff_vs_best_source, resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
        eval_commands=eval_commands(config, Path(outcome.model_dir)),
        previous=decision.previous, evolved_minus_previous=decision.diff_vs_previous,
    )
    md = write_comparison(run_dir, comparison)
    result = CombineResult(
        run_dir=run_dir, model_dir=Path(outcome.model_dir), plan=plan, fused=fused, dropped=dropped,
        recipe_hash=outcome.recipe_hash, method=outcome.method, comparison=comparison, decision=decision,
    )
    write_text_atomic(Path(outcome.model_dir) / CARD_FILE, model_card(result, outcome, infos, previous, md))
    _write(run_dir / RESULT_FILE, result)
    return result


def eval_commands(config: CombineConfig, folder: Path) -> list[str]:
    """``umm eval`` commands that score ``folder`` on the comparison's test items."""
    from umm.evolve.run import eval_commands as evolve_eval_commands

    ecfg = evolve_config(config, [str(folder)], str(folder)).model_copy(update={"batch_size": config.eval_batch_size})
    extra = f" --max-new-tokens {config.max_new_tokens}" if config.max_new_tokens else ""
    return [c + extra for c in evolve_eval_commands(ecfg, folder)]


def model_card(result: CombineResult, outcome: EvolveOutcome, infos: Sequence[ModelInfo],
               previous: ModelInfo | None, table_md: str) -> str:
    """The merged model's ``README.md``: both stages, the recipe, the test table and the decision."""
    names = {m.path: m.name for m in infos}
    if previous is not None:
        names.setdefault(previous.path, f"{previous.name} (previous)")

    def name(p: str) -> str:
        return names.get(p, Path(p).name)

    plan = result.plan
    lines = [
        "---", "tags: [merge, umm, fusion, evolutionary-merge]", "---", "",
        "# Merged model (umm combine)", "",
        f"**Decision: {result.decision.text}**", "",
        "## Plan", "",
        f"- stages: {' then '.join(plan.stages)}",
        f"- pivot: {name(plan.pivot)} (`{plan.pivot}`)",
        f"- base of the merge: {name(plan.base)} (`{plan.base}`)",
        f"- pivot-family models merged as they are: {', '.join(name(p) for p in plan.family) or 'none'}",
        "", "## Stage 1: pairwise fusion into the pivot", "",
    ]
    if not plan.fuse:
        lines.append("Every model shares the pivot's family (architecture and tokenizer): nothing to fuse.")
    for src in plan.fuse:
        if src in result.fused:
            lines.append(f"- {name(src)}: fused into the pivot -> `{result.fused[src]}`")
    for d in result.dropped:
        lines.append(f"- {name(d.source)}: **dropped**: {d.reason}")
    lines += [
        "", "## Stage 2: evolutionary layer-wise merge", "",
        f"CMA-ES search ({outcome.method}) over {', '.join(name(p) for p in outcome.models)} "
        f"onto {name(outcome.base)}; best fitness on the search split {outcome.best_fitness:.4f}.",
        f"Recipe `{outcome.recipe}` (sha256 `{result.recipe_hash}`):", "", "```yaml",
        Path(outcome.recipe).read_text(encoding="utf-8").rstrip(), "```", "",
        "## Test split", "", table_md, "",
        "## Decision", "", result.decision.text, "",
    ]
    return "\n".join(lines)


def default_run_dir(config_path: str | Path, config: CombineConfig) -> Path:
    """``./runs/combine-<config stem>-seed<seed>`` under the current directory."""
    return Path.cwd() / "runs" / f"combine-{Path(config_path).stem}-seed{config.seed}"
