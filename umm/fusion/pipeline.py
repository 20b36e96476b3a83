"""``umm fuse``: one distribution fusion from a YAML config, stage by stage.

Stages (reported through :class:`FuseEvents`: the pipeline prints nothing, ``umm fuse`` shows them):

1. **Check** every input before any heavy work: the data file (a bad line is named), each model
   folder (a pivot that is not a causal LM is refused), each tokenizer (remote code refused).
2. **Pivot**: the configured one, or (``pivot: null``) the candidate with the best score on the
   hardest domain of the evaluation tasks, scored with :func:`umm.eval.evaluate` on the ``search``
   split only (:func:`umm.fusion.pivot.choose_pivot`; ``pivot_domain`` overrides the domain).
3. **Teacher passes** of the pivot and every source (cached by model manifest, data hash, k, max
   length and prompt layout: adding a source later runs only the new one); the storage cost per
   response token and the truncated/dropped counts are reported.
4. **Training** of the pivot on the fused targets (:func:`umm.fusion.train.train_pivot`;
   ``resume`` continues from its last checkpoint; a finished output is reused).
5. **Final table** on the ``test`` split of every task: pivot before, fused pivot, each source.
   Also written to ``<output>/fuse_report.json``.

Every sequence is tokenised in the configured prompt ``layout`` (:mod:`umm.fusion.data`: ``auto``,
``chat``, ``plain`` or ``raw``); stage 1 refuses ``chat`` for a model whose tokenizer has no
template, and stage 3 warns when ``auto`` gives the models different layouts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, Field, ValidationError

from umm import configfile
from umm.atomic import write_json_atomic
from umm.errors import UmmError
from umm.eval.sandbox import DEFAULT_WORKERS
from umm.fusion.settings import FusionSettings, TrainingSettings
from umm.progress import ProgressSink
from umm.ui import progress_sink

if TYPE_CHECKING:
    from umm.training import StepReport

logger = logging.getLogger(__name__)

REPORT_NAME = "fuse_report.json"
RECIPE_NAME = "fusion_recipe.json"


class FuseConfigError(UmmError):
    """The fuse config file is missing, unreadable or invalid."""


class EvalSettings(configfile.Strict):
    """Evaluation: tasks (their domains), subset sizes per split, generation batch size."""

    tasks: list[str] = Field(default_factory=lambda: ["gsm8k", "humaneval"], min_length=1)
    search_limit: int | None = Field(64, ge=1)
    test_limit: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    seed: int = 0
    max_new_tokens: int | None = Field(None, ge=1)
    sandbox_workers: int = Field(DEFAULT_WORKERS, ge=1)


class FuseConfig(FusionSettings):
    """Everything ``umm fuse`` needs (see ``examples/fuse.yaml`` for every key, commented): the
    shared :class:`~umm.fusion.settings.FusionSettings`, the models, the output and the evaluation."""

    pivot: Path | None = None
    sources: list[Path] = Field(default_factory=list)
    pivot_domain: str | None = None
    data: Path
    output: Path
    eval: EvalSettings = Field(default_factory=EvalSettings)
    final_eval: bool = True
    device: str = "auto"

    def candidates(self) -> list[Path]:
        """The pivot (if given) then the sources, without duplicates."""
        seen: list[Path] = []
        for p in ([self.pivot] if self.pivot is not None else []) + list(self.sources):
            if not any(_same(p, q) for q in seen):
                seen.append(p)
        return seen


_SECTIONS: dict[str, type[BaseModel]] = {"": FuseConfig, "training": TrainingSettings, "eval": EvalSettings}


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def parse_config(data: Any, *, source: str = "<dict>", base_dir: Path | None = None) -> FuseConfig:
    """Validate a mapping into a :class:`FuseConfig`.

    Relative paths of models and data are relative to ``base_dir`` (the config file's folder, the
    path rule of :mod:`umm.configfile`); ``output`` and ``teacher_cache`` are relative to the
    current directory (outputs never land beside the config, e.g. in the checkout's
    ``examples/``). Raises :class:`FuseConfigError` listing every problem.
    """
    if not isinstance(data, dict):
        raise FuseConfigError(f"{source}: the config must be a YAML mapping (got {type(data).__name__})")
    if isinstance(data.get("sources"), str):
        data = {**data, "sources": [data["sources"]]}
    data = configfile.resolve_paths(data, ("pivot", "sources", "data"), base_dir)

    def target(p: Any) -> Any:  # an output: relative to the current directory, never the config's
        return str(Path(p).expanduser().absolute()) if isinstance(p, str) else p

    for key in ("output", "teacher_cache"):
        if key in data:
            data[key] = target(data[key])
    try:
        cfg = FuseConfig.model_validate(data)
    except ValidationError as exc:
        raise FuseConfigError(configfile.explain(exc, f"invalid fuse config {source}:", _SECTIONS)) from None
    n = len(cfg.candidates())
    if cfg.pivot is None and n < 2:
        raise FuseConfigError(f"{source}: with pivot: null, list at least two models under sources "
                              "(the pivot is chosen among them)")
    if cfg.pivot is not None and n < 2:
        raise FuseConfigError(f"{source}: list at least one source model besides the pivot")
    return cfg


def load_config(path: str | Path, **overrides: Any) -> FuseConfig:
    """Read a YAML config; ``overrides`` (e.g. ``device="cpu"``, ``output=...``) replace top-level
    keys when not ``None`` (an ``output`` given on the command line is relative to the current
    directory)."""
    if overrides.get("output") is not None:
        overrides["output"] = str(Path(overrides["output"]).resolve())
    return configfile.load_config(path, parse_config, FuseConfigError, overrides=overrides)


# --------------------------------------------------------------------------- results


@dataclass
class ModelScores:
    """One model's scores per task: (score, ci_low, ci_high, n)."""

    name: str
    path: str
    role: str  # "pivot (before)", "fused", "source"
    scores: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)


@dataclass
class TeacherInfo:
    name: str
    path: str
    n_tokens: int
    storage_bytes: int
    bytes_per_token: float
    n_truncated: int
    n_dropped: int
    dense_bytes_per_token: int
    directory: str
    layout: str  # the resolved prompt layout of this model's pass (chat, plain or raw)


@dataclass
class FuseResult:
    """What a run produced: the pivot, the output folder, teacher costs and the final table."""

    pivot: Path
    sources: list[Path]
    output: Path
    teachers: list[TeacherInfo]
    pivot_scores: dict[str, dict[str, float]] | None  # search-split scores (model -> domain -> score)
    hardest_domain: str | None
    test: list[ModelScores]
    trained: bool  # False when a finished output was reused (resume)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pivot": str(self.pivot), "sources": [str(s) for s in self.sources], "output": str(self.output),
            "teachers": [asdict(t) for t in self.teachers], "pivot_search_scores": self.pivot_scores,
            "hardest_domain": self.hardest_domain,
            "test": [{"name": m.name, "path": m.path, "role": m.role,
                      "scores": {t: {"score": s, "ci": [lo, hi], "n": n} for t, (s, lo, hi, n) in m.scores.items()}}
                     for m in self.test],
        }


#: ``scorer(model_path, tasks, split, limit) -> {task: (score, ci_low, ci_high, n)}``
Scorer = Callable[[Path, Sequence[str], str, int | None], dict[str, tuple[float, float, float, int]]]


def make_scorer(settings: EvalSettings, device: str, *, on_progress: ProgressSink | None = None) -> Scorer:
    """The default scorer: :func:`umm.eval.evaluate_folder` with ``settings`` on ``device``; its
    bars go to ``on_progress``."""

    def score(path: Path, tasks: Sequence[str], split: str, limit: int | None) -> dict[str, tuple[float, float, float, int]]:
        from umm.eval import evaluate_folder

        res = evaluate_folder(path, list(tasks), split=split, limit=limit, seed=settings.seed,  # type: ignore[arg-type]
                              batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens,
                              device=device, on_progress=on_progress, sandbox_workers=settings.sandbox_workers)
        return {t: (s.score, s.ci_low, s.ci_high, s.n) for t, s in res.scores.items()}

    return score


def task_domains(tasks: Sequence[str]) -> dict[str, str]:
    """Task name -> its domain (the evaluator's own label; the task name if it has none)."""
    from umm.eval import get_task

    return {t: (get_task(t).domain or t) for t in tasks}


def domain_scores(per_task: dict[str, tuple[float, float, float, int]], domains: dict[str, str]) -> dict[str, float]:
    """Mean task score per domain."""
    acc: dict[str, list[float]] = {}
    for task, (s, *_rest) in per_task.items():
        acc.setdefault(domains[task], []).append(s)
    return {d: sum(v) / len(v) for d, v in acc.items()}


# --------------------------------------------------------------------------- stages


def check_inputs(cfg: FuseConfig) -> Any:
    """Stage 1: load the data (errors name the line) and check every model folder and tokenizer
    (including that it can provide the configured prompt layout).

    Returns the loaded :class:`~umm.fusion.data.InstructionData`.
    """
    from umm.checkpoints.errors import CheckpointError
    from umm.checkpoints.loading import check_model_config, load_tokenizer
    from umm.checkpoints.reader import Checkpoint
    from umm.fusion.data import InstructionData, resolve_layout

    data = InstructionData.from_jsonl(cfg.data)
    for path in cfg.candidates():
        role = "pivot" if cfg.pivot is not None and _same(path, cfg.pivot) else "source"
        try:
            with Checkpoint.open(path) as ckpt:
                check_model_config(ckpt.config, ckpt.path / "config.json")
            tokenizer = load_tokenizer(path)
        except CheckpointError as e:
            raise UmmError(f"{role} {path}: {e}") from None
        try:
            resolve_layout(tokenizer, cfg.layout)
        except UmmError as e:
            raise UmmError(f"{role} {path}: {e}") from None
    return data


def choose_pivot_by_search(cfg: FuseConfig, scorer: Scorer,
                           note: Callable[[str], None]) -> tuple[Path, dict[str, dict[str, float]], str]:
    """Stage 2 without a configured pivot: score every candidate on ``search``; pick the best of the
    hardest domain (or ``pivot_domain``). ``note`` receives a message per candidate.
    Returns (pivot, model -> domain -> score, domain)."""

    def score(path: Path) -> dict[str, tuple[float, float, float, int]]:
        return scorer(path, cfg.eval.tasks, "search", cfg.eval.search_limit)

    return pivot_by_search(cfg.candidates(), cfg.eval.tasks, score, note, pivot_domain=cfg.pivot_domain)


def pivot_by_search(
    candidates: Sequence[Path],
    tasks: Sequence[str],
    score: Callable[[Path], dict[str, tuple[float, float, float, int]]],
    note: Callable[[str], None],
    *,
    pivot_domain: str | None = None,
) -> tuple[Path, dict[str, dict[str, float]], str]:
    """The pivot among ``candidates``: each is scored with ``score(path)`` (task -> (score, ci_low,
    ci_high, n) on the ``search`` split), its task scores averaged per domain
    (:func:`domain_scores`); the pivot is the best on the hardest domain, or on ``pivot_domain``
    (:func:`umm.fusion.pivot.choose_pivot`). Returns (pivot, model -> domain -> score, domain)."""
    from umm.fusion.pivot import choose_pivot, hardest_domain

    domains = task_domains(tasks)
    if pivot_domain is not None and pivot_domain not in domains.values():
        raise UmmError(f"pivot_domain {pivot_domain!r} is not the domain of any eval task "
                       f"({', '.join(sorted(set(domains.values())))})")
    by_key: dict[str, Path] = {}
    scores: dict[str, dict[str, float]] = {}
    for path in candidates:
        key = str(path)
        by_key[key] = path
        note(f"scoring candidate {path.name} on the search split ({', '.join(tasks)})")
        scores[key] = domain_scores(score(path), domains)
    domain = pivot_domain or hardest_domain(scores)
    chosen = choose_pivot(scores, domain=domain)
    return by_key[chosen], scores, domain


def run_teacher_passes(cfg: FuseConfig, pivot: Path, sources: Sequence[Path], data: Any, device: str,
                       *, show_progress: bool = False,
                       on_progress: ProgressSink | None = None) -> list[TeacherInfo]:
    """Stage 3: the (cached) teacher pass of the pivot and of each source; their bars go to
    ``on_progress`` (``show_progress``: terminal bars)."""
    from umm.checkpoints.loading import load_tokenizer
    from umm.fusion.teacher import teacher_pass
    from umm.paths import home

    cache = cfg.teacher_cache or home() / "fusion" / "teachers"
    out = []
    for path in [pivot, *sources]:
        t = teacher_pass(path, data, cache, k=cfg.k, batch_size=cfg.teacher_batch_size, device=device,
                         max_length=cfg.max_length, show_progress=show_progress, on_progress=on_progress,
                         layout=cfg.layout)
        vocab = len(load_tokenizer(path))
        out.append(TeacherInfo(path.name, str(path), t.n_tokens, t.storage_bytes, t.bytes_per_token,
                               t.n_truncated, t.n_dropped, 2 * vocab, str(t.dir), t.layout))
    return out


def train_config(cfg: FuseConfig, pivot: Path, sources: Sequence[Path], device: str, resume: bool) -> Any:
    """The :class:`~umm.fusion.train.FusionTrainConfig` of this run."""
    from umm.fusion.train import FusionTrainConfig
    from umm.paths import home

    return FusionTrainConfig(
        pivot=pivot, sources=list(sources), data=cfg.data, output=cfg.output,
        teacher_cache=cfg.teacher_cache or home() / "fusion" / "teachers", k=cfg.k, max_length=cfg.max_length,
        teacher_batch_size=cfg.teacher_batch_size, layout=cfg.layout, fusion=cfg.fusion, vocab_map=cfg.vocab_map,
        temperature=cfg.temperature, ce_unit=cfg.ce_unit, lam=cfg.lam, device=device, resume=resume,
        **cfg.training.model_dump(),
    )


def output_is_complete(output: Path) -> bool:
    """Whether ``output`` holds a finished fused model (written last, atomically, by training)."""
    return (output / RECIPE_NAME).is_file() and (output / "config.json").is_file()


def run_fuse(
    cfg: FuseConfig,
    *,
    resume: bool = False,
    show_progress: bool = False,
    on_progress: ProgressSink | None = None,
    scorer: Scorer | None = None,
    events: FuseEvents | None = None,
) -> FuseResult:
    """Run every stage of the fusion described by ``cfg`` (see the module docstring).

    ``scorer`` replaces the evaluation (default: :func:`make_scorer`); ``events`` receives the
    stages, messages, tables' data and training steps (default: nothing is shown).
    ``on_progress`` receives the progress bars of the teacher passes, the alignment and the
    evaluation (``show_progress``: terminal bars, :func:`umm.ui.progress_sink`).
    """
    from umm.checkpoints.loading import resolve_device
    from umm.fusion.train import train_pivot

    events = events or _Quiet()
    on_progress = progress_sink(on_progress, show_progress)
    device = str(resolve_device(cfg.device))
    scorer = scorer or make_scorer(cfg.eval, device, on_progress=on_progress)
    if cfg.output.exists() and not resume and (not cfg.output.is_dir() or any(cfg.output.iterdir())):
        raise UmmError(f"output {cfg.output} exists and is not empty; choose another, remove it, "
                       "or pass --resume to continue that run")

    events.stage(Stage(1))
    data = check_inputs(cfg)
    events.note(f"data {cfg.data}: {len(data)} examples")

    events.stage(Stage(2))
    search_scores: dict[str, dict[str, float]] | None = None
    hardest: str | None = None
    if cfg.pivot is not None:
        pivot = cfg.pivot
        events.note(f"pivot {pivot} (from the config)")
    else:
        pivot, search_scores, hardest = choose_pivot_by_search(cfg, scorer, events.note)
        events.candidates_scored(search_scores, pivot, hardest)
    sources = [p for p in cfg.candidates() if not _same(p, pivot)]

    events.stage(Stage(3))
    teachers = run_teacher_passes(cfg, pivot, sources, data, device, on_progress=on_progress)
    events.teacher_passes(teachers, cfg)
    _warn_about_teachers(teachers, cfg, events)

    events.stage(Stage(4))
    trained = True
    if resume and output_is_complete(cfg.output):
        trained = False
        events.note(f"{cfg.output} already holds the finished fused model; not training again")
    else:
        train_pivot(train_config(cfg, pivot, sources, device, resume), on_progress=on_progress,
                    on_step=events.training_step)
        events.note(f"fused model written to {cfg.output}")

    result = FuseResult(pivot, sources, cfg.output, teachers, search_scores, hardest, [], trained)
    if cfg.final_eval:
        events.stage(Stage(5, ", ".join(cfg.eval.tasks)))
        rows_of = [("pivot (before)", pivot), ("fused", cfg.output), *(("source", s) for s in sources)]
        for role, path in rows_of:
            ms = ModelScores(path.name, str(path), role, scorer(path, cfg.eval.tasks, "test", cfg.eval.test_limit))
            result.test.append(ms)
        events.results(result, cfg.eval.tasks)
    write_json_atomic(cfg.output / REPORT_NAME, result.to_dict(), indent=1)
    return result


def _warn_about_teachers(teachers: Sequence[TeacherInfo], cfg: FuseConfig, events: FuseEvents) -> None:
    """Warnings of stage 3: prompt layouts that differ between models, truncated or dropped examples."""
    if len({t.layout for t in teachers}) > 1:
        events.warning("layout auto gives these models different prompt layouts ("
                       + ", ".join(f"{t.name}: {t.layout}" for t in teachers)
                       + "); set layout to chat, plain or raw to give them the same prompts")
    for t in teachers:
        if t.n_truncated or t.n_dropped:
            events.warning(f"{t.name}: {t.n_truncated} responses truncated to max_length={cfg.max_length}, "
                           f"{t.n_dropped} examples dropped (prompt alone fills the context)")


# --------------------------------------------------------------------------- what a run reports


#: the stages of a run, in order (see :mod:`umm.fusion.pipeline`)
STAGE_TITLES = (
    "checking inputs",
    "pivot",
    "teacher passes",
    "training the pivot on the fused distributions",
    "evaluation on the test split",
)


@dataclass(frozen=True)
class Stage:
    """Stage ``number`` (1-based) of :data:`STAGE_TITLES`; ``detail`` adds context (e.g. the tasks)."""

    number: int
    detail: str = ""

    @property
    def title(self) -> str:
        return STAGE_TITLES[self.number - 1]

    @property
    def total(self) -> int:
        return len(STAGE_TITLES)


class FuseEvents(Protocol):
    """Receives a fusion run's progress. Every method here does nothing: subclass and override what
    you show (``umm fuse`` renders them all on the console)."""

    def stage(self, stage: Stage) -> None:
        """A stage begins."""

    def note(self, text: str) -> None:
        """A plain progress message (what was read, chosen or written)."""

    def warning(self, text: str) -> None:
        """Something the user should fix or know (e.g. prompt layouts that differ between models)."""

    def candidates_scored(self, scores: dict[str, dict[str, float]], pivot: Path, domain: str) -> None:
        """The pivot search: model -> domain -> search-split score; ``pivot`` is best on ``domain``."""

    def teacher_passes(self, teachers: Sequence[TeacherInfo], cfg: FuseConfig) -> None:
        """The teacher passes are done (or were cached): their sizes and costs."""

    def training_step(self, report: StepReport) -> None:
        """One optimizer step of the pivot's training."""

    def results(self, result: FuseResult, tasks: Sequence[str]) -> None:
        """The final test-split scores of every model (``result.test``)."""


class _Quiet(FuseEvents):
    """The default: a run that shows nothing."""
