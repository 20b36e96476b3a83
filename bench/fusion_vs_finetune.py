"""Distribution fusion against plain fine-tuning (lambda = 1) on the same data, as a grid.

    python bench/fusion_vs_finetune.py --split search \
        --setting 1000:2:0.9:1 --setting 1000:2:0.5:2 --setting 300:4:0.5:2 [--work DIR]

Each ``--setting PER:EPOCHS:LAM:T`` trains the pivot (default: the suite's math expert) with
``umm fuse`` on ``PER`` train records of the source's domain (list) and ``PER`` of the pivot's
(math), for ``EPOCHS`` epochs, at fusion weight ``LAM`` and teacher temperature ``T``; for every
(PER, EPOCHS) it also trains the lambda = 1 twin (gold responses only, same data, steps and seed).
Every model is scored on ``--limit`` items per task of ``--split`` (choose settings on
``search``, then run the chosen ones once on ``test``). It prints, per model, the task scores
and the objective (mean over the tasks), and for each fused model its difference from its
lambda = 1 twin with the paired-bootstrap 95% interval over the same items
(:func:`umm.eval.stats.paired_bootstrap_difference`). Scores are kept in
``<work>/<split>/scores.json``, so a rerun scores only new settings. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _setting(text: str) -> tuple[int, int, float, float]:
    per, epochs, lam, temperature = text.split(":")
    return int(per), int(epochs), float(lam), float(temperature)


def _name(per: int, epochs: int, lam: float, temperature: float) -> str:
    return f"d{per}-e{epochs}-lam{lam:g}-T{temperature:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="full")
    ap.add_argument("--pivot", default="math")
    ap.add_argument("--source", default="list")
    ap.add_argument("--setting", action="append", type=_setting, required=True,
                    help="PER:EPOCHS:LAM:T (repeatable)")
    ap.add_argument("--split", choices=["search", "test"], default="search")
    ap.add_argument("--limit", type=int, default=256, help="items per task")
    ap.add_argument("--tasks", default="synth-math,synth-code,synth-list")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--work", default=str(Path(__file__).parent / "out" / "fusion_vs_finetune"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from umm.eval import evaluate_folder
    from umm.eval.stats import paired_bootstrap_difference
    from umm.experts.build import ensure_suite
    from umm.experts.instruction_data import write_instruction_data
    from umm.fusion.pipeline import parse_config, run_fuse

    torch.set_num_threads(args.threads)
    suite = ensure_suite(args.variant)
    pivot, source = suite.path(args.pivot), suite.path(args.source)
    domains = (suite.models[args.source]["domains"][0], suite.models[args.pivot]["domains"][0])
    tasks = [t for t in args.tasks.split(",") if t]
    work = Path(args.work) / args.split
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "scores.json"
    scores: dict[str, dict[str, list[float]]] = json.loads(cache.read_text()) if cache.exists() else {}

    def score(name: str, path: Path) -> None:
        if name not in scores:
            res = evaluate_folder(path, tasks, split=args.split, limit=args.limit, device="cpu", show_progress=False)
            scores[name] = {t: [1.0 if s.correct else 0.0 for s in res.samples[t]] for t in tasks}
            cache.write_text(json.dumps(scores))

    def fuse(name: str, per: int, epochs: int, lam: float, temperature: float) -> None:
        out = work / name
        if name not in scores and not out.exists():
            data = work / f"data-{per}.jsonl"
            if not data.exists():  # one data file per size, shared by its settings
                write_instruction_data(data, dict.fromkeys(domains, per))
            run_fuse(parse_config({
                "pivot": str(pivot), "sources": [str(source)], "data": str(data), "output": str(out),
                "teacher_cache": str(work / "teachers"), "k": 10, "max_length": 128, "layout": "raw",
                "fusion": "minCE", "ce_unit": "char", "temperature": temperature, "lam": lam, "device": "cpu",
                "final_eval": False, "eval": {"tasks": tasks},
                "training": {"lr": args.lr, "epochs": epochs, "batch_size": 16, "warmup_ratio": 0.03, "seed": 0,
                             "checkpoint_every": 10_000},
            }), show_progress=False)
        score(name, out)

    score("pivot", pivot)
    pairs = []
    for per, epochs, lam, temperature in args.setting:
        twin = _name(per, epochs, 1.0, 1.0)
        fuse(twin, per, epochs, 1.0, 1.0)
        if lam != 1.0:
            fuse(_name(per, epochs, lam, temperature), per, epochs, lam, temperature)
            pairs.append((_name(per, epochs, lam, temperature), twin))

    weights = dict.fromkeys(tasks, 1.0)
    print(f"{args.split}, {args.limit} items per task; objective = mean of {', '.join(tasks)}")
    for name, s in scores.items():
        means = {t: sum(v) / len(v) for t, v in s.items()}
        print(f"{name:28s} " + " ".join(f"{t} {means[t]:.3f}" for t in tasks)
              + f"  objective {sum(means.values()) / len(tasks):.4f}")
    for fused, twin in pairs:
        d = paired_bootstrap_difference(scores[fused], scores[twin], weights)
        print(f"{fused} - {twin}: {d.diff:+.4f} [{d.ci_low:+.4f}, {d.ci_high:+.4f}]")


if __name__ == "__main__":
    main()
