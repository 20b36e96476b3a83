"""Bench: ``umm eval`` against lm-evaluation-harness (``lm-eval``, HF back end) on the same model and items.

Both tools are run as whole processes (Python start-up, imports, model loading, generation,
scoring), one CPU thread each, on the tiny expert suite's math expert (``synth-math``) and code
expert (``synth-code``):

1. writes ``--n`` items (default 1,024) of each task's ``test`` distribution to JSONL: the first
   ``--n`` records of ``split_records(suite, "test", n)`` (prefix-stable: the 256 items
   ``umm eval --split test`` uses are the first 256), so every item is distinct and has its own id;
2. writes local lm-eval tasks (``dataset_path: json``) with umm's prompt text, greedy decoding,
   umm's stop strings and max new tokens, and umm's answer extraction
   (``bench/lmeval_task/utils.py`` calls ``umm.eval.extract``: the number after ``#### N``);
3. runs ``lm_eval --model hf --model_args pretrained=FOLDER,dtype=float32`` and ``umm eval`` at
   batch size 1 and at the default batch size (umm's 16; lm-eval's default is 1, so its batched
   run uses ``--batch_size 16``), measuring wall seconds (``time.perf_counter``) and CPU seconds
   (the child's rusage from ``os.wait4``, its reaped children included);
4. compares the extracted answer of every item (lm-eval's ``--log_samples`` against umm's
   ``--samples``) and lists the items that differ.

The code task is scored by execution. lm-eval only generates (running model output inside its
own process would be unsandboxed); its completions are then scored by umm's sandboxed scorer
(``umm eval --task synth-code --completions FILE``), and that scoring process is counted in
lm-eval's time. umm's ``--data`` file is split half/half by a hash of each item's key and the
generated ``test`` items all fall into the half called ``search``, hence ``--split search``
(the bench checks that umm scored every item).

    /work/venv-bench/bin/python bench/bench_eval_vs_lmeval.py                # 1,024 items
    python bench/bench_eval_vs_lmeval.py --n 256 --batch-sizes 16 --tasks synth-math
    python bench/bench_eval_vs_lmeval.py --experts-dir /work/exp/home/experts
    UMM_SPEEDUPS=0 python bench/bench_eval_vs_lmeval.py   # umm with transformers' model and tokenizer

Needs ``lm-eval`` in the same environment (``pip install -e '.[bench]'``, into a separate
virtual environment: see bench/README.md). The last line reads
``umm/lm-eval items/s: R; accuracy umm A, lm-eval B; differing answers N`` (math, each tool at
its default batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bench_merge import byte_compile_umm, run_measured

HERE = Path(__file__).resolve().parent
UMM_DEFAULT_BATCH = 16  # umm eval's --batch-size default
LMEVAL_DEFAULT_BATCH = 1  # lm_eval's --batch_size default


@dataclass(frozen=True)
class TaskSetup:
    """One task of the bench: umm's name, the expert that answers it, lm-eval's prompt and hook."""

    name: str  # umm task (synth-math / synth-code)
    domain: str  # expert of the suite
    doc_to_text: str  # lm-eval Jinja prompt, equal to the suite's prompt(record)
    process: str  # hook in utils.py
    metric: str


TASKS = {
    "synth-math": TaskSetup("synth-math", "math", "Question: {{question}}\\nAnswer:", "process_math", "acc"),
    "synth-code": TaskSetup("synth-code", "code", "{{text}}\\n", "process_code", "generated"),
}


@dataclass
class Run:
    """One whole-process run of a tool on a task."""

    tool: str
    task: str
    batch_size: int
    wall: float
    cpu: float
    n: int
    accuracy: float
    answers: list[str | None]  # extracted answer (code: extracted program) per item, file order
    outputs: list[str]  # completions per item, file order

    @property
    def items_per_s(self) -> float:
        return self.n / self.wall


def write_items(task: str, n: int, path: Path) -> list[dict]:
    """The first ``n`` ``test`` records of the task's suite, one JSON object a line."""
    from umm.eval.suites import SUITES, split_records

    recs = split_records(SUITES[task], "test", n, seed=0)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def write_lmeval_task(setup: TaskSetup, data: Path, folder: Path) -> str:
    """A local lm-eval task reading ``data`` with the suite's prompt, stops and length; its name."""
    from umm.eval.suites import SUITES

    suite = SUITES[setup.name]
    name = setup.name.replace("-", "_") + "_bench"
    until = ", ".join(json.dumps(s) for s in suite.stop)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f'doc_to_text: "{setup.doc_to_text}"\n'
        'doc_to_target: ""\n'
        "generation_kwargs:\n"
        f"  until: [{until}]\n"
        "  do_sample: false\n"
        f"  max_gen_toks: {suite.max_new_tokens}\n"
        f"process_results: !function utils.{setup.process}\n"
        "metric_list:\n"
        f"  - metric: {setup.metric}\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
    )
    shutil.copy(HERE / "lmeval_task" / "utils.py", folder / "utils.py")
    return name


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", UMM_NO_PROGRESS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        sys.exit(f"{exe} not found: run this bench with the Python of an environment that has umm and lm-eval")
    return str(exe)


def measured(cmd: list[str]) -> tuple[float, float]:
    wall, cpu, _rss, code, tail = run_measured(cmd, child_env())
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}\n{tail}")
    return wall, cpu


def ids_of(task: str, data: Path) -> list[str]:
    """umm's id of every line of ``data`` (file order)."""
    from umm.eval.task import get_task

    return [s.id for s in get_task(task, data).all_samples()]


def read_umm_samples(path: Path, ids: list[str]) -> tuple[list[str | None], list[str], list[bool]]:
    recs = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
    if set(recs) != set(ids):
        sys.exit(f"umm scored {len(recs)} items of {len(ids)}; expected every item of the data file")
    return [recs[i]["extracted"] for i in ids], [recs[i]["output"] for i in ids], [recs[i]["correct"] for i in ids]


def run_umm(setup: TaskSetup, model: Path, data: Path, bs: int, out: Path) -> Run:
    samples = out / f"umm-{setup.name}-b{bs}.jsonl"
    cmd = [tool("umm"), "eval", str(model), "--task", setup.name, "--data", str(data), "--split", "search",
           "--device", "cpu", "--dtype", "float32", "--threads", "1", "--samples", str(samples)]
    if bs != UMM_DEFAULT_BATCH:
        cmd += ["--batch-size", str(bs)]
    wall, cpu = measured(cmd)
    answers, outputs, correct = read_umm_samples(samples, ids_of(setup.name, data))
    return Run("umm", setup.name, bs, wall, cpu, len(ids_of(setup.name, data)), sum(correct) / len(correct),
               answers, outputs)


def run_lmeval(setup: TaskSetup, model: Path, data: Path, task_dir: Path, lm_task: str, bs: int, out: Path) -> Run:
    from umm.eval.extract import extract_final_number

    dest = out / f"lmeval-{setup.name}-b{bs}"
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [tool("lm_eval"), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--tasks", lm_task, "--include_path", str(task_dir), "--device", "cpu",
           "--output_path", str(dest), "--log_samples"]
    if bs != LMEVAL_DEFAULT_BATCH:
        cmd += ["--batch_size", str(bs)]
    wall, cpu = measured(cmd)
    (samples_file,) = dest.rglob(f"samples_{lm_task}_*.jsonl")
    by_doc = {r["doc_id"]: r for r in map(json.loads, samples_file.read_text().splitlines())}
    outputs = [by_doc[i]["resps"][0][0] for i in range(len(by_doc))]
    if setup.name == "synth-math":
        answers: list[str | None] = [extract_final_number(o) for o in outputs]
        acc = sum(by_doc[i]["acc"] for i in range(len(by_doc))) / len(by_doc)
        return Run("lm-eval", setup.name, bs, wall, cpu, len(outputs), acc, answers, outputs)
    # code: score lm-eval's completions with umm's sandboxed scorer, and count that process too
    ids = ids_of(setup.name, data)
    comp = out / f"lmeval-{setup.name}-b{bs}-completions.jsonl"
    comp.write_text("".join(json.dumps({"task_id": i, "completion": o}) + "\n" for i, o in zip(ids, outputs)))
    scored = out / f"lmeval-{setup.name}-b{bs}-scored.jsonl"
    w2, c2 = measured([tool("umm"), "eval", "--task", setup.name, "--data", str(data), "--completions", str(comp),
                       "--samples", str(scored)])
    answers, _, correct = read_umm_samples(scored, ids)
    return Run("lm-eval", setup.name, bs, wall + w2, cpu + c2, len(ids), sum(correct) / len(correct), answers, outputs)


def differing(a: Run, b: Run) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a.answers, b.answers)) if x != y]


def show(r: Run) -> None:
    print(f"{r.task:<11} {r.tool:<8} batch {r.batch_size:>3}: wall {r.wall:7.2f} s  CPU {r.cpu:7.2f} s  "
          f"{r.items_per_s:7.1f} items/s  accuracy {r.accuracy:.3f}  (n={r.n})", flush=True)


def explain(a: Run, b: Run, diff: list[int], limit: int = 3) -> None:
    for i in diff[:limit]:
        print(f"    item {i}: {a.tool} {a.outputs[i]!r} -> {a.answers[i]!r}; {b.tool} {b.outputs[i]!r} -> {b.answers[i]!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1024, help="items per task (>= 1,000 for the issue's figure)")
    ap.add_argument("--batch-sizes", default=f"1,{UMM_DEFAULT_BATCH}", help="batch sizes run by both tools")
    ap.add_argument("--experts-dir", type=Path, help="root of the expert suites (default: umm's, $UMM_HOME/experts)")
    ap.add_argument("--variant", default="full", help="expert suite variant (built if missing)")
    ap.add_argument("--tasks", default="synth-math,synth-code", help="comma-separated, of: " + ", ".join(TASKS))
    ap.add_argument("--out", type=Path, default=HERE / "out" / "eval_vs_lmeval")
    args = ap.parse_args()

    from umm.experts.build import ensure_suite

    suite = ensure_suite(args.variant, args.experts_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    task_dir = args.out / "lmeval_tasks"
    task_dir.mkdir(exist_ok=True)
    byte_compile_umm()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    names = [t for t in args.tasks.split(",") if t]
    if not names or any(t not in TASKS for t in names):
        sys.exit(f"--tasks: give some of {', '.join(TASKS)}")
    print(f"{args.n} items per task, one thread, suite {suite.variant} at {suite.root}", flush=True)
    runs: dict[tuple[str, str, int], Run] = {}
    for name in names:
        setup = TASKS[name]
        model = suite.path(suite.expert_for(setup.domain))
        data = args.out / f"{name}-{args.n}.jsonl"
        write_items(name, args.n, data)
        lm_task = write_lmeval_task(setup, data, task_dir)
        for bs in sizes:
            for r in (run_umm(setup, model, data, bs, args.out),
                      run_lmeval(setup, model, data, task_dir, lm_task, bs, args.out)):
                runs[(r.tool, name, bs)] = r
                show(r)
            u, lm = runs[("umm", name, bs)], runs[("lm-eval", name, bs)]
            diff = differing(u, lm)
            print(f"{name:<11} batch {bs:>3}: umm/lm-eval items/s {u.items_per_s / lm.items_per_s:.2f}, "
                  f"CPU lm-eval/umm {lm.cpu / u.cpu:.2f}, differing answers {len(diff)}", flush=True)
            explain(u, lm, diff)
    head = names[0]
    u = runs.get(("umm", head, UMM_DEFAULT_BATCH)) or runs[("umm", head, sizes[-1])]
    lm = runs.get(("lm-eval", head, LMEVAL_DEFAULT_BATCH)) or runs[("lm-eval", head, sizes[0])]
    defaults = u.batch_size == UMM_DEFAULT_BATCH and lm.batch_size == LMEVAL_DEFAULT_BATCH
    print(f"headline: {head}, umm at batch {u.batch_size} against lm-eval at batch {lm.batch_size}"
          + (" (each tool's default)" if defaults else ""))
    print(f"CPU seconds lm-eval/umm: {lm.cpu / u.cpu:.2f} (steadier than wall time on a shared machine)")
    print(f"umm/lm-eval items/s: {u.items_per_s / lm.items_per_s:.2f}; accuracy umm {u.accuracy:.3f}, "
          f"lm-eval {lm.accuracy:.3f}; differing answers {len(differing(u, lm))}")


if __name__ == "__main__":
    main()
