"""Demonstration of distribution fusion on the tiny expert suite, with the lambda = 1 ablation.

    python bench/demo_fusion.py --variant full [--dir DIR] [--pivot math] [--source list]
                                [--per-domain 1000] [--test-limit 200] [--threads 1]
                                [--split test|search] [--lr 3e-4] [--lam 0.9] [--temperature 1]

What it does (prints figures, asserts nothing):

1. Instruction-response data from the suites' ``train`` split only
   (:func:`umm.experts.instruction_data.write_instruction_data`): ``--per-domain`` records of the
   source's domain and of the pivot's own domain (so the pivot keeps seeing its domain).
2. ``--layout raw`` (default), passed as the ``layout`` key of the fuse config: each sequence is
   tokenised as ``tokenizer(instruction) + tokenizer(response) + eos``, exactly the layout the
   experts were trained and are evaluated in. ``--layout plain`` uses :mod:`umm.fusion.data`'s
   ``### Instruction / ### Response`` wrapper instead (it collapses the experts' scores).
3. ``umm fuse`` (:func:`umm.fusion.pipeline.run_fuse`): pivot <- source, MinCE on per-character
   cross-entropies, top-10, lambda = 0.9, lr 3e-4, 2 epochs.
4. The ablation: the same run with lambda = 1 (plain fine-tuning of the pivot on the same data,
   same steps, same seed); then the table on ``--split`` (default ``test``): pivot before, fused,
   lambda = 1, source, all on the same items.
5. The checks of the issue: the fused pivot's score on the source's domain rises; its own
   domain stays inside the 95% interval of the pivot before fusion; fused beats lambda = 1.

Settings were chosen on the ``search`` split (``--split search``; lr 1e-3 lost the pivot's math
there), never on ``test``. Writes ``<work>/demo_fusion.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="full")
    ap.add_argument("--dir", default=None, help="parent folder of the suite (default: umm's experts cache)")
    ap.add_argument("--work", default=str(Path(__file__).parent / "out" / "demo_fusion"))
    ap.add_argument("--pivot", default="math", help="suite model used as the pivot")
    ap.add_argument("--source", default="list", help="suite model fused into it (another family and tokenizer)")
    ap.add_argument("--per-domain", type=int, default=1000, help="train records per domain in the fusion data")
    ap.add_argument("--layout", choices=["raw", "plain", "chat", "auto"], default="raw",
                    help="prompt layout of the fusion data (the fuse config's layout key)")
    ap.add_argument("--lam", type=float, default=0.9)
    ap.add_argument("--lr", type=float, default=3e-4, help="chosen on search: 1e-3 erases the tiny pivot's math")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--fusion", choices=["minCE", "avgCE"], default="minCE")
    ap.add_argument("--ce-unit", choices=["char", "token"], default="char",
                    help="unit of the cross-entropies fusion compares (the fuse config's ce_unit key)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--split", choices=["search", "test"], default="test",
                    help="split of the final table: choose settings on search, report test")
    ap.add_argument("--tasks", default="synth-math,synth-code,synth-list")
    ap.add_argument("--test-limit", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from umm.cli.fuse import ConsoleFuseEvents, results_table
    from umm.experts.build import SuiteNotBuiltError, ensure_suite, load_suite
    from umm.experts.instruction_data import write_instruction_data
    from umm.experts.recipes import RECIPES
    from umm.fusion.pipeline import ModelScores, make_scorer, parse_config, run_fuse
    from umm.ui import Bars, console, table

    torch.set_num_threads(args.threads)
    try:
        suite = load_suite(args.variant, args.dir)  # as built (a newer recipe is not rebuilt here)
    except SuiteNotBuiltError:
        if args.variant not in RECIPES:
            raise
        suite = ensure_suite(args.variant, args.dir, on_progress=Bars())
    work = Path(args.work) / f"{suite.variant}-{args.layout}-{args.split}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    pivot_domain = suite.models[args.pivot]["domains"][0]
    source_domain = suite.models[args.source]["domains"][0]
    data = write_instruction_data(work / "data.jsonl", {source_domain: args.per_domain, pivot_domain: args.per_domain})
    pivot, source = suite.path(args.pivot), suite.path(args.source)
    tasks = [t for t in args.tasks.split(",") if t]

    def config(out: str, lam: float, final_eval: bool):
        return parse_config({
            "pivot": str(pivot), "sources": [str(source)], "data": str(data), "output": str(work / out),
            "teacher_cache": str(work / "teachers"), "k": 10, "max_length": 128, "layout": args.layout,
            "fusion": args.fusion, "ce_unit": args.ce_unit, "temperature": args.temperature,
            "lam": lam, "device": args.device, "final_eval": final_eval,
            "training": {"lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size, "warmup_ratio": 0.03,
                         "seed": 0, "checkpoint_every": 10_000},
            "eval": {"tasks": tasks, "test_limit": args.test_limit, "batch_size": 50},
        })

    t0 = time.perf_counter()
    fused = run_fuse(config("fused", args.lam, False), events=ConsoleFuseEvents(), show_progress=True)
    t_fused = time.perf_counter() - t0
    t1 = time.perf_counter()
    run_fuse(config("lambda1", 1.0, False), events=ConsoleFuseEvents(), show_progress=True)
    t_plain = time.perf_counter() - t1
    t2 = time.perf_counter()
    scorer = make_scorer(config("x", 1.0, False).eval, args.device, on_progress=Bars())
    rows = [("pivot (before)", pivot), ("fused", work / "fused"), ("fine-tune (lambda=1)", work / "lambda1"),
            ("source", source)]
    fused.test = [ModelScores(p.name, str(p), role, scorer(p, tasks, args.split, args.test_limit)) for role, p in rows]
    plain = fused.test[2]
    t_eval = time.perf_counter() - t2
    console.print(results_table(fused, tasks, args.split))

    by_role = {m.role: m for m in fused.test}
    before, after = by_role["pivot (before)"], by_role["fused"]
    src_task = next(t for t in tasks if t.endswith(source_domain))
    own_task = next(t for t in tasks if t.endswith(pivot_domain))
    s_b, s_a, s_p = before.scores[src_task][0], after.scores[src_task][0], plain.scores[src_task][0]
    o_b, o_lo, o_hi = before.scores[own_task][:3]
    o_a = after.scores[own_task][0]
    mean = lambda m: sum(m.scores[t][0] for t in tasks) / len(tasks)  # noqa: E731
    checks = [
        (f"fused raises {src_task}", f"{s_b:.3f} -> {s_a:.3f}", s_a > s_b),
        (f"{src_task} rise outside the pivot's 95% CI", f"pivot CI high {before.scores[src_task][2]:.3f}",
         s_a > before.scores[src_task][2]),
        (f"{own_task} stays in (or above) the pivot's 95% CI", f"{o_a:.3f} vs [{o_lo:.3f}, {o_hi:.3f}]", o_a >= o_lo),
        (f"fused beats lambda=1 on {src_task}", f"{s_a:.3f} vs {s_p:.3f}", s_a > s_p),
        ("fused beats lambda=1 on the mean of the tasks", f"{mean(after):.3f} vs {mean(plain):.3f}", mean(after) > mean(plain)),
    ]
    console.print(table("checks", ["claim", "numbers", "holds"], [(c, n, "yes" if ok else "NO") for c, n, ok in checks]))
    t = fused.teachers
    console.print("teacher storage: " + ", ".join(f"{x.name} {x.bytes_per_token:.1f} B/token (dense fp16 "
                                                  f"{x.dense_bytes_per_token} B/token)" for x in t))
    console.print(f"wall time: fused run {t_fused:.0f}s (incl. teacher passes), lambda=1 run {t_plain:.0f}s, "
                  f"evaluation of 4 models {t_eval:.0f}s, total {time.perf_counter() - t0:.0f}s")
    report = {"variant": suite.variant, "layout": args.layout, "args": vars(args), **fused.to_dict(),
              "checks": [{"claim": c, "numbers": n, "holds": ok} for c, n, ok in checks],
              "split": args.split,
              "seconds": {"fused": t_fused, "lambda1": t_plain, "eval": t_eval}}
    (work / "demo_fusion.json").write_text(json.dumps(report, indent=1))
    console.print(f"wrote {work / 'demo_fusion.json'}")


if __name__ == "__main__":
    main()
