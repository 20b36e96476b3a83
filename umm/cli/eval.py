"""``umm eval``: score a model (or given completions) on reasoning tasks, with 95% intervals.

    umm eval MODEL --task gsm8k,humaneval [--split test] [--limit N] [--output r.json] [--samples s.jsonl]
    umm eval MODEL --task humaneval --num-samples 10 --temperature 0.8     # pass@1, pass@10
    umm eval --task humaneval --completions completions.jsonl
    umm eval --list
"""

from __future__ import annotations

from pathlib import Path

import typer

from umm.cli.common import user_errors




def register(app: typer.Typer) -> None:
    """Add ``umm eval`` to the ``umm`` app."""
    app.command("eval")(eval_command)


def eval_command(
    model: Path | None = typer.Argument(None, help="Model folder (Hugging Face format, safetensors). Not needed with --completions or --list."),
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
    workers: int = typer.Option(2, "--workers", help="Sandboxed programs run in parallel (code tasks)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: the usable cores minus --workers, at least 1)."),
    list_: bool = typer.Option(False, "--list", help="List the tasks with their domains and split sizes, and exit."),
) -> None:
    """Evaluate MODEL on one or more tasks and print scores with 95% confidence intervals."""
    with user_errors():
        if list_:
            _list_tasks()
            return
        _run(model, task, split, limit, seed, data, output, samples, completions, device, dtype, batch_size,
             max_new_tokens, chat, workers, threads, num_samples, temperature)


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


def _run(model, task, split, limit, seed, data, output, samples, completions, device, dtype, batch_size,
         max_new_tokens, chat, workers, threads, num_samples, temperature) -> None:
    from umm.errors import UmmError
    from umm.eval.task import get_task, read_jsonl

    names = [t.strip() for t in task.split(",") if t.strip()]
    if not names:
        raise UmmError("give at least one task with --task (see umm eval --list)")
    if split is not None and split not in ("search", "test"):
        raise UmmError(f"unknown --split {split!r}; use search or test")
    if limit is not None and limit < 1:
        raise UmmError("--limit must be >= 1")
    if batch_size < 1:
        raise UmmError("--batch-size must be >= 1")
    if num_samples < 1 or temperature < 0:
        raise UmmError("--num-samples must be >= 1 and --temperature >= 0")
    if num_samples > 1 and temperature == 0:
        raise UmmError("--num-samples > 1 needs --temperature > 0 (greedy decoding repeats itself)")
    if data is not None and len(names) > 1:
        raise UmmError("--data applies to one task; evaluate tasks with their own data files one at a time")
    tasks = [get_task(n, data) for n in names]
    for t in tasks:
        t.all_samples()  # bad data fails now, before a model is loaded

    if completions is not None:
        if model is not None:
            raise UmmError("give either MODEL or --completions, not both")
        if len(tasks) != 1:
            raise UmmError("--completions scores one task at a time")
        if limit is not None:
            raise UmmError("--limit does not apply to --completions (every completion given is scored)")
        from umm.eval.evaluate import score_completions

        recs = read_jsonl(completions, ("task_id", "completion"))
        result = score_completions(tasks[0], recs, split=split, sandbox_workers=workers)
    else:
        if model is None:
            raise UmmError("give a MODEL folder (or --completions FILE to score completions without a model)")
        from umm.checkpoints.loading import load_causal_lm, load_tokenizer, resolve_device
        from umm.cli.common import set_threads
        from umm.eval.evaluate import evaluate

        set_threads(threads, sandbox_workers=workers)
        dev = resolve_device(device)
        lm = load_causal_lm(model, device=dev, dtype=dtype)
        tok = load_tokenizer(model)
        result = evaluate(lm, tok, tasks, split=split or "test", limit=limit, seed=seed, batch_size=batch_size, device=dev,
                          max_new_tokens=max_new_tokens, chat_template=chat, sandbox_workers=workers,
                          num_samples=num_samples, temperature=temperature)
        result.meta["model"] = str(model)
    _report(result, output, samples)


def _report(result, output: Path | None, samples: Path | None) -> None:
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
