"""Report of ``bench/gpu_check.sh``: generation back ends side by side on one GPU.

Reads, from the check's work folder, what each back end wrote:

- ``eval-<backend>.json`` / ``samples-<backend>.jsonl`` (``umm eval --output/--samples``): items
  per task, the seconds each task took (generation + scoring), the score;
- ``timings.jsonl`` (one ``{"step", "seconds"}`` line per step of the script): the whole
  ``umm eval`` / ``umm evolve`` process, start-up and model load included;
- ``evolve-<backend>/search_state.json`` (``umm evolve``): seconds per candidate (apply + score)
  and seconds applying the weights;

and prints per back end: items/s (tasks only, and whole process), candidate seconds, and the
agreement with the first back end (the reference): the share of items whose extracted answers
are equal, and the fitness of the search's first candidate (the same starting genome for all).
The last line reads ``<b>/<ref> items/s: R; candidate seconds <ref> A, <b> B; agreement P``
for the last back end, so a script can read it.

    python bench/gpu_report.py WORK_DIR --backends loop hf vllm
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class EvalRun:
    """One ``umm eval`` run: items, task seconds, process seconds, score per task, answers."""

    items: int
    task_seconds: float
    process_seconds: float
    scores: dict[str, float]
    answers: dict[tuple[str, str], str | None]

    @property
    def items_per_s(self) -> float:
        return self.items / self.task_seconds if self.task_seconds > 0 else math.nan

    @property
    def process_items_per_s(self) -> float:
        return self.items / self.process_seconds if self.process_seconds > 0 else math.nan


@dataclass(frozen=True)
class SearchRun:
    """One short ``umm evolve``: candidates, mean seconds per candidate and applying, first fitness."""

    candidates: int
    candidate_seconds: float
    apply_seconds: float
    first_fitness: float
    best_fitness: float


def read_timings(path: Path) -> dict[str, float]:
    """Step name -> wall seconds, from the script's ``timings.jsonl``."""
    out: dict[str, float] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                out[str(rec["step"])] = float(rec["seconds"])
    return out


def read_eval(work: Path, backend: str, timings: dict[str, float]) -> EvalRun | None:
    scores_path, samples_path = work / f"eval-{backend}.json", work / f"samples-{backend}.jsonl"
    if not scores_path.is_file() or not samples_path.is_file():
        return None
    scores = json.loads(scores_path.read_text(encoding="utf-8"))["scores"]
    answers: dict[tuple[str, str], str | None] = {}
    for line in samples_path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            answers[(rec["task"], rec["id"])] = rec["extracted"]
    return EvalRun(
        items=sum(int(s["n"]) for s in scores.values()),
        task_seconds=sum(float(s["seconds"]) for s in scores.values()),
        process_seconds=timings.get(f"eval-{backend}", math.nan),
        scores={k: float(s["score"]) for k, s in scores.items()},
        answers=answers,
    )


def read_search(work: Path, backend: str) -> SearchRun | None:
    from umm.evolve.state import load_state

    folder = work / f"evolve-{backend}"
    if not (folder / "search_state.json").is_file():
        return None
    cands = [c for g in load_state(folder).generations for c in g.candidates]
    if not cands:
        return None
    first = min(cands, key=lambda c: (c.generation, c.index))
    return SearchRun(
        candidates=len(cands),
        candidate_seconds=sum(c.seconds for c in cands) / len(cands),
        apply_seconds=sum(c.apply_seconds for c in cands) / len(cands),
        first_fitness=first.fitness,
        best_fitness=max(c.fitness for c in cands),
    )


def agreement(a: EvalRun, b: EvalRun) -> float:
    """Share of the items of ``a`` whose extracted answer ``b`` gives too (same task and id)."""
    keys = list(a.answers)
    return sum(a.answers[k] == b.answers.get(k) for k in keys) / len(keys) if keys else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", type=Path, help="the work folder of bench/gpu_check.sh")
    ap.add_argument("--backends", nargs="+", default=["loop", "vllm"], help="first one is the reference")
    ap.add_argument("--device-name", default="", help="the card's name, printed in the header")
    args = ap.parse_args(argv)
    timings = read_timings(args.work / "timings.jsonl")
    evals = {b: read_eval(args.work, b, timings) for b in args.backends}
    searches = {b: read_search(args.work, b) for b in args.backends}
    ref = args.backends[0]
    print(f"generation back ends on {args.device_name or 'this GPU'} (reference: {ref})")
    print(f"{'backend':8} {'items':>6} {'items/s':>9} {'items/s (process)':>18} {'agree':>6} "
          f"{'s/candidate':>12} {'s applying':>11} {'fitness[0]':>11} {'best':>7}  scores")
    for b in args.backends:
        e, s = evals[b], searches[b]
        agree = agreement(evals[ref], e) if e is not None and evals[ref] is not None else math.nan
        scores = " ".join(f"{k}={v:.3f}" for k, v in e.scores.items()) if e else "(no eval output)"
        print(f"{b:8} {e.items if e else 0:>6} {e.items_per_s if e else math.nan:>9.1f} "
              f"{e.process_items_per_s if e else math.nan:>18.1f} {agree:>6.3f} "
              f"{s.candidate_seconds if s else math.nan:>12.3f} {s.apply_seconds if s else math.nan:>11.4f} "
              f"{s.first_fitness if s else math.nan:>11.4f} {s.best_fitness if s else math.nan:>7.4f}  {scores}")
    last = args.backends[-1]
    e_ref, e_last, s_ref, s_last = evals[ref], evals[last], searches[ref], searches[last]
    ratio = e_last.items_per_s / e_ref.items_per_s if e_ref and e_last else math.nan
    agree = agreement(e_ref, e_last) if e_ref and e_last else math.nan
    print(f"{last}/{ref} items/s: {ratio:.2f}; candidate seconds {ref} "
          f"{s_ref.candidate_seconds if s_ref else math.nan:.3f}, {last} "
          f"{s_last.candidate_seconds if s_last else math.nan:.3f}; agreement {agree:.3f}")
    missing = [b for b in args.backends if evals[b] is None or searches[b] is None]
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
