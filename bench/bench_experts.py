"""Tiny expert suite: build time, size, and accuracy of every model on every domain's test split.

    python bench/bench_experts.py --variant full [--dir DIR] [--limit 200] [--threads 1]

Builds the suite if it is missing or stale (reports the per-model training time recorded in
``suite.json``), then scores base and experts with ``umm.eval.evaluate`` on ``synth-*`` test
items (greedy, zero-shot; code executed in the sandbox), with 95% Wilson intervals. Prints a
table and writes ``bench/out/experts_<variant>.json``. Timings on a shared machine are inflated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="full")
    ap.add_argument("--dir", default=None, help="parent folder of the suite (default: umm's experts cache)")
    ap.add_argument("--limit", type=int, default=200, help="test items per domain")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=50)
    args = ap.parse_args()

    import torch

    from umm.eval.evaluate import evaluate
    from umm.eval.suites import SUITES
    from umm.experts.build import ensure_suite
    from umm.ui import Bars, console, table

    torch.set_num_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    suite = ensure_suite(args.variant, args.dir, on_progress=Bars())
    console.print(f"suite {suite.variant} at {suite.root}: ready in {time.perf_counter() - t0:.1f}s wall, "
                  f"{time.process_time() - c0:.1f}s CPU (recorded build {suite.info['build_seconds']:.0f}s wall)")
    tasks = list(SUITES)
    results: dict[str, dict] = {}
    for name, entry in suite.models.items():
        model, tok = suite.load(name)
        t = time.perf_counter()
        res = evaluate(model, tok, tasks, split="test", limit=args.limit, batch_size=args.batch_size,
                       num_threads=args.threads, on_progress=Bars())
        results[name] = {
            "params": entry["params"],
            "train_seconds": entry["train_seconds"],
            "eval_seconds": round(time.perf_counter() - t, 1),
            "scores": {k: {"n": s.n, "correct": s.correct, "score": s.score, "ci": [s.ci_low, s.ci_high]}
                       for k, s in res.scores.items()},
        }
    rows = []
    for name, r in results.items():
        cells = [f"{r['scores'][t]['score']:.3f} [{r['scores'][t]['ci'][0]:.2f}, {r['scores'][t]['ci'][1]:.2f}]" for t in tasks]
        rows.append([name, f"{r['params']:,}", f"{r['train_seconds']:.0f}", *cells, f"{r['eval_seconds']:.0f}"])
    console.print(table(f"{suite.variant}: accuracy on test (n={args.limit} per domain, 95% CI)",
                        ["model", "params", "train s", *tasks, "eval s"], rows))
    # The suite's bar: every expert's 95% CI on its own domain lies above the base's of the same family.
    bases = suite.info["bases"]
    for name, entry in suite.models.items():
        for domain in entry["domains"]:
            task = next(t for t in tasks if SUITES[t].domain == domain)
            ref = bases.get(entry["family"]) or bases.get("llama")
            mine, theirs = results[name]["scores"][task], results[ref]["scores"][task]
            verdict = "clearly beats" if mine["ci"][0] > theirs["ci"][1] else "does NOT clearly beat"
            console.print(f"{name} {verdict} {ref} on {task}: {mine['score']:.3f} vs {theirs['score']:.3f}")
    out = Path(__file__).parent / "out" / f"experts_{suite.variant}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"variant": suite.variant, "root": str(suite.root), "limit": args.limit,
                               "build_seconds": suite.info["build_seconds"], "models": results}, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
