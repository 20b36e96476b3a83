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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import BaseModel, ConfigDict

from umm.combine.config import CombineConfig
from umm.combine.decision import Decision
from umm.combine.plan import CombinePlan
from umm.errors import UmmError
from umm.evolve.report import Comparison
from umm.progress import ProgressSink

if TYPE_CHECKING:
    from umm.eval.evaluate import EvalResult

#: ``scorer(model folder, tasks, split, limit) -> EvalResult`` (scores and per-item samples)
Scorer = Callable[[Path, Sequence[str], str, "int | None"], "EvalResult"]


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
    of the comparison (default: :func:`umm.eval.evaluate_folder` with the config's seed, batch
    size, device and ``max_new_tokens``). Returns the :class:`CombineResult` also written to
    ``combine.json``."""
    raise NotImplementedError("run_combine: being written")


def default_run_dir(config_path: str | Path, config: CombineConfig) -> Path:
    """``./runs/combine-<config stem>-seed<seed>`` under the current directory."""
    return Path.cwd() / "runs" / f"combine-{Path(config_path).stem}-seed{config.seed}"
