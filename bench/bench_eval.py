"""Bench: throughput of ``umm eval`` on the synthetic suites, and the cost of one search candidate.

Prints, for a tiny Llama (a seeded random one unless ``--model`` is given):

1. samples/s of generation with our own decode loop vs ``model.generate`` (same greedy text),
   at batch size 1 and the default batch size, on ``synth-math`` prompts;
2. samples/s of :func:`umm.eval.evaluate` (generation + scoring) per synthetic task at batch
   size 1 vs the default batch size;
3. seconds to score one CMA-ES candidate: ``evaluate`` on a 64-item ``search`` subset of each
   synthetic task with the model already loaded (what the search does per candidate).

    python bench/bench_eval.py                       # random tiny model (2 layers, hidden 64)
    python bench/bench_eval.py --model ~/.cache/umm/experts/math --threads 1
    python bench/bench_eval.py --hidden 128 --layers 4 --n 64
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("UMM_NO_PROGRESS", "1")


def _timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _cpu_and_wall(fn) -> tuple[float, float, object]:
    """CPU seconds of this process (fair on a shared machine) and wall seconds of one call."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="model folder (default: a seeded random tiny Llama)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n", type=int, default=32, help="samples per throughput measurement")
    ap.add_argument("--batch-size", type=int, default=16, help="the default batch size to compare with 1")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--workers", type=int, default=2, help="sandbox workers (code tasks)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umm.eval import evaluate, get_task, list_tasks
    from umm.eval.generate import generate

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from umm.experts.random_models import make_random_llama

            path = make_random_llama(Path(tmp) / "m", seed=0, hidden_size=args.hidden, num_layers=args.layers)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
        tok = AutoTokenizer.from_pretrained(path)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: {path} ({n_params / 1e6:.2f}M params), torch threads {args.threads}, "
              f"cpu count {os.cpu_count()}, load avg {os.getloadavg()[0]:.1f}")

        task = get_task("synth-math")
        prompts = [s.prompt for s in task.samples("search", limit=args.n)]
        print(f"\n1. generation backends ({args.n} synth-math prompts, max_new_tokens={task.max_new_tokens}); "
              f"best of {args.repeat}, configurations interleaved")
        configs = [(b, bs) for bs in (1, args.batch_size) for b in ("loop", "hf")]
        cpu: dict = {c: [] for c in configs}
        wall: dict = {c: [] for c in configs}
        texts = {}
        for _ in range(args.repeat):
            for backend, bs in configs:
                c, w, out = _cpu_and_wall(lambda backend=backend, bs=bs: generate(model, tok, prompts, max_new_tokens=task.max_new_tokens,
                                                           stop=task.stop, batch_size=bs, backend=backend))
                cpu[(backend, bs)].append(c)
                wall[(backend, bs)].append(w)
                texts[(backend, bs)] = out
        for backend, bs in configs:
            c, w = min(cpu[(backend, bs)]), min(wall[(backend, bs)])
            print(f"   {backend:4s} batch {bs:3d}: {len(prompts) / w:8.1f} samples/s wall ({w:.2f} s), "
                  f"{len(prompts) / c:8.1f} samples/CPU-s ({c:.2f} CPU s)")
        same = all(v == texts[("loop", 1)] for v in texts.values())
        print(f"   identical outputs across backends and batch sizes: {same}")

        synth = [t for t in list_tasks() if t.startswith("synth-")]
        print(f"\n2. evaluate() throughput ({args.n} search items per task)")
        for name in synth:
            for bs in (1, args.batch_size):
                sec, res = _timed(lambda name=name, bs=bs: evaluate(model, tok, [name], limit=args.n, batch_size=bs, show_progress=False,
                                                   sandbox_workers=args.workers), args.repeat)
                print(f"   {name:11s} batch {bs:3d}: {args.n / sec:8.1f} samples/s ({sec:.2f} s)")

        print("\n3. one CMA-ES candidate: evaluate() on a 64-item search subset, model already loaded")
        total = 0.0
        for name in synth:
            sec, res = _timed(lambda name=name: evaluate(model, tok, [name], limit=64, batch_size=args.batch_size,
                                               show_progress=False, sandbox_workers=args.workers), args.repeat)
            total += sec
            s = res.scores[name]  # type: ignore[union-attr]
            print(f"   {name:11s}: {sec:6.2f} s  (score {s.score:.3f}, 95% CI [{s.ci_low:.3f}, {s.ci_high:.3f}])")
        print(f"   all synthetic tasks: {total:.2f} s per candidate")


if __name__ == "__main__":
    main()
