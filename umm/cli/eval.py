"""``umm eval``: score a model (or given completions) on reasoning tasks, with 95% intervals.

    umm eval MODEL --task gsm8k,humaneval [--split test] [--limit N] [--output r.json] [--samples s.jsonl]
    umm eval MODEL --task humaneval --num-samples 10 --temperature 0.8     # pass@1, pass@10
    umm eval --task humaneval --completions completions.jsonl
    umm eval MODEL --task synth-math --backend vllm          # generate with vLLM (umm[vllm], a CUDA GPU)
    umm eval --list
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from umm.cli.common import user_errors

if TYPE_CHECKING:  # the CLI imports the library lazily, so `umm --help` stays fast
    from umm.eval.evaluate import EvalResult
    from umm.eval.task import Task


@dataclass(frozen=True)
class EvalOptions:
    """What ``umm eval`` was asked to do (its arguments and flags, as typed values)."""

    model: str | None
    tasks: tuple[str, ...]
    split: str | None
    limit: int | None
    seed: int
    data: Path | None
    output: Path | None
    samples: Path | None
    completions: Path | None
    device: str
    dtype: str
    batch_size: int
    max_new_tokens: int | None
    chat: bool | None
    workers: int
    threads: int | None
    num_samples: int
    temperature: float
    backend: str | None = None


def register(app: typer.Typer) -> None:
    """Add ``umm eval`` to the ``umm`` app."""
    app.command("eval")(eval_command)


def eval_command(
    model: str | None = typer.Argument(None, help="Model folder (Hugging Face format, safetensors) or Hugging Face Hub id (org/name, org/name@revision). Not needed with --completions or --list."),
    task: str = typer.Option("", "--task", "-t", help="Task name(s), comma-separated (see --list)."),
    split: str | None = typer.Option(None, "--split", help="search (used to tune merges) or test (used to report; the default). With --completions, default: every item."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate a seeded subset of N items per task."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit subset."),
    data: Path | None = typer.Option(None, "--data", help="Read the task's items from this JSONL file (public format of the task)."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write scores as JSON here."),
    samples: Path | None = typer.Option(None, "--samples", help="Write per-sample records (prompt, output, extracted, correct) as JSONL here."),
    completions: Path | None = typer.Option(None, "--completions", help="Score these completions (JSONL: task_id, completion) instead of a model."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    dtype: str = typer.Option("auto", "--dtype", help="float32, bfloat16, float16 or auto (the checkpoint's)."),
    batch_size: int = typer.Option(16, "--batch-size", "-b", help="Prompts generated together."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Override the tasks' generation length."),
    chat: bool | None = typer.Option(None, "--chat/--no-chat", help="Force the chat template on/off (default: per task, when the tokenizer has one)."),
    num_samples: int = typer.Option(1, "--num-samples", "-n", help="Completions per item (needs --temperature > 0); gives pass@k."),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy (default); > 0: sampling (seeded by --seed)."),
    workers: int | None = typer.Option(None, "--workers", help="Sandboxed programs run in parallel (code tasks; default: umm.eval's default)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: the usable cores minus --workers, at least 1)."),
    backend: str | None = typer.Option(None, "--backend", help="Who generates: loop (umm's PyTorch decoding, the default), hf (transformers' generate), vllm (a vLLM engine: umm[vllm] and a CUDA GPU, else an error saying why) or auto (vllm when it can run and load the model, else the default, with a warning saying why)."),
    list_: bool = typer.Option(False, "--list/--no-list", help="List the tasks with their domains and split sizes, and exit."),
) -> None:
    """Evaluate MODEL on one or more tasks and print scores with 95% confidence intervals."""
    with user_errors():
        if list_:
            _list_tasks()
            return
        _run(EvalOptions(
            model=model, tasks=tuple(t.strip() for t in task.split(",") if t.strip()), split=split, limit=limit,
            seed=seed, data=data, output=output, samples=samples, completions=completions, device=device,
            dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens, chat=chat, workers=_workers(workers),
            threads=threads, num_samples=num_samples, temperature=temperature, backend=backend,
        ))


def _workers(workers: int | None) -> int:
    from umm.eval.sandbox import DEFAULT_WORKERS

    return DEFAULT_WORKERS if workers is None else workers


def _list_tasks() -> None:
    from umm.errors import UmmError
    from umm.eval.task import get_task, list_tasks
    from umm.ui import console, table

    rows = []
    for name in list_tasks():
        t = get_task(name)
        try:
            sizes = t.split_sizes()
            size_s, size_t = sizes["search"], sizes["test"]
        except UmmError:  # a task whose default data is missing is still listed
            size_s = size_t = "needs --data"
        rows.append((name, t.domain, t.kind, size_s, size_t, t.description))
    console.print(table("umm eval tasks", ["task", "domain", "kind", "search", "test", "description"], rows))


def _run(o: EvalOptions) -> None:
    from umm.eval.task import get_task

    _check(o)
    tasks = [get_task(n, o.data) for n in o.tasks]
    for t in tasks:
        t.all_samples()  # bad data fails now, before a model is loaded
    result = _score_completions(o, tasks) if o.completions is not None else _score_model(o, tasks)
    _report(result, o.output, o.samples)


def _check(o: EvalOptions) -> None:
    """The flags' own errors, before any data or model is read."""
    from umm.errors import UmmError
    from umm.eval.backends import check_backend

    if o.backend is not None:
        check_backend(o.backend)
    if not o.tasks:
        raise UmmError("give at least one task with --task (see umm eval --list)")
    if o.split is not None and o.split not in ("search", "test"):
        raise UmmError(f"unknown --split {o.split!r}; use search or test")
    if o.limit is not None and o.limit < 1:
        raise UmmError("--limit must be >= 1")
    if o.batch_size < 1:
        raise UmmError("--batch-size must be >= 1")
    if o.num_samples < 1 or o.temperature < 0:
        raise UmmError("--num-samples must be >= 1 and --temperature >= 0")
    if o.num_samples > 1 and o.temperature == 0:
        raise UmmError("--num-samples > 1 needs --temperature > 0 (greedy decoding repeats itself)")
    if o.data is not None and len(o.tasks) > 1:
        raise UmmError("--data applies to one task; evaluate tasks with their own data files one at a time")


def _score_completions(o: EvalOptions, tasks: list[Task]) -> EvalResult:
    from umm.errors import UmmError
    from umm.eval.evaluate import score_completions
    from umm.eval.task import read_jsonl
    from umm.ui import Bars

    assert o.completions is not None
    if o.model is not None:
        raise UmmError("give either MODEL or --completions, not both")
    if len(tasks) != 1:
        raise UmmError("--completions scores one task at a time")
    if o.limit is not None:
        raise UmmError("--limit does not apply to --completions (every completion given is scored)")
    recs = read_jsonl(o.completions, ("task_id", "completion"))
    return score_completions(tasks[0], recs, split=o.split, sandbox_workers=o.workers,  # type: ignore[arg-type]
                             on_progress=Bars())


def _score_model(o: EvalOptions, tasks: list[Task]) -> EvalResult:
    from umm.checkpoints.hub import resolve_folder
    from umm.cli.common import set_threads
    from umm.errors import UmmError
    from umm.speedups import import_frozen
    from umm.ui import Bars

    # torch and the model code: see umm.speedups.import_frozen
    import_frozen("umm.eval.evaluate", "umm.eval.native")
    from umm.eval.evaluate import evaluate_folder
    from umm.eval.generate import DEFAULT_BACKEND

    if o.model is None:
        raise UmmError("give a MODEL folder (or --completions FILE to score completions without a model)")
    folder = resolve_folder(o.model, on_progress=Bars())
    set_threads(o.threads, sandbox_workers=o.workers)
    return evaluate_folder(folder, tasks, split=o.split or "test", limit=o.limit, seed=o.seed,  # type: ignore[arg-type]
                           batch_size=o.batch_size, device=o.device, dtype=o.dtype, max_new_tokens=o.max_new_tokens,
                           chat_template=o.chat, sandbox_workers=o.workers, num_samples=o.num_samples,
                           temperature=o.temperature, on_progress=Bars(), backend=o.backend or DEFAULT_BACKEND)


def _report(result: EvalResult, output: Path | None, samples: Path | None) -> None:
    from umm.ui import console, table

    rows = []
    for s in result.scores.values():
        extra = "  ".join(f"pass@{k}={v:.3f}" for k, v in sorted(s.pass_at_k.items()) if k > 1)
        rows.append((s.task, s.split, s.n, f"{s.score:.3f}", f"[{s.ci_low:.3f}, {s.ci_high:.3f}]",
                     f"{s.seconds:.1f}s", extra))
    console.print(table("umm eval", ["task", "split", "n", "score", "95% CI", "time", "pass@k"], rows))
    if output is not None:
        console.print(f"scores written to {result.write_json(output)}")
    if samples is not None:
        console.print(f"samples written to {result.write_samples(samples)}")
