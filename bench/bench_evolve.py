"""Bench: how much the in-memory candidate path of ``umm evolve`` saves, and where a candidate's
time goes.

1. **Apply vs disk** on the ~220M-parameter bf16 bench models of ``bench_merge.py`` (base + two
   of its experts, built once under ``bench/out/models``): time to apply one task-arithmetic
   candidate (per-layer weights) to the live model in memory (:class:`umm.evolve.apply.LiveMerge`)
   against merging the same recipe to disk with the streaming executor and loading the result
   (``load_causal_lm``), what a search without the in-memory path does per candidate.
   Also TIES candidates (density 0.5): the live merge is set up as for a TIES search, so the
   setup includes ranking every task vector's magnitudes once (the cost is printed).
2. **Apply vs evaluate** on the tiny experts (``umm experts prepare --variant full``, if built):
   a short search (``--generations`` generations) with the math and code experts, and the
   share of each candidate's time spent applying vs evaluating, from ``history.jsonl``.
3. **Scale-out on Ray** (``--part ray``, needs ``umm[ray]``) on the tiny experts (``--variant``,
   default ``small`` for this part): the same CMA-ES search (same seed, so the same candidates)
   scored serially by one worker (in a process of its own, before and after the Ray runs: their
   mean is the serial rate), then by 1 and by 2 Ray actors on a local
   cluster started for the purpose (a head node, plus a second node of 1 CPU for 2 workers;
   1 torch thread everywhere). Candidates per hour count the search loop only (the one-off set-up
   of the actors and of the serial worker, with one warm-up candidate each, is printed beside but
   left out: a process's first candidate is about twice as slow); the load average of the
   machine is printed with each figure. The last line reads
   ``ray 2 workers / serial candidates per hour: R``.

    python bench/bench_evolve.py                     # the apply and split parts, 3 candidates each
    python bench/bench_evolve.py --part apply --repeat 5 --device cpu --threads 1
    python bench/bench_evolve.py --part split --generations 2 --search-size 16
    python bench/bench_evolve.py --part ray --generations 4 --search-size 32

Prints one table per part; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _layer_recipe(method: str, base: Path, experts: list[Path], seed: int, num_layers: int, density: float | None):
    """A candidate as the search writes it: per-layer weight gradients per model."""
    import numpy as np

    from umm.merge import MergeRecipe

    rng = np.random.default_rng(seed)
    models = []
    for e in experts:
        params: dict = {"weight": [round(float(v), 4) for v in rng.uniform(0.2, 0.8, num_layers)]}
        if density is not None:
            params["density"] = density
        models.append({"model": str(e), "parameters": params})
    return MergeRecipe.from_dict(
        {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32", "out_dtype": "bfloat16"}
    )


def part_apply(args: argparse.Namespace) -> None:
    import torch
    from bench_merge import build_models

    from umm.checkpoints.loading import load_causal_lm
    from umm.checkpoints.reader import Checkpoint
    from umm.evolve.apply import LiveMerge
    from umm.merge.disk import merge
    from umm.ui import console, table

    paths = build_models(HERE / "out" / "models")
    base, experts = paths["base"], [paths["e1"], paths["e2"]]
    with Checkpoint.open(base) as ck:
        num_layers = ck.num_layers or 0
        n_params = ck.num_parameters
    console.print(f"bench models: {n_params / 1e6:.0f}M parameters, {num_layers} layers, device {args.device}, "
                  f"torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    model = load_causal_lm(base, device=args.device, dtype=args.dtype)
    # set up as for a TIES search (task vectors + ranks); task-arithmetic candidates run on it too
    live = LiveMerge(_layer_recipe("ties", base, experts, 0, num_layers, 0.5), model, device=args.device)
    setup_s = time.perf_counter() - t0
    gib = 1 << 30
    cached = sum(t.numel() * t.element_size() for ts in live.inputs.values() for t in ts) / gib
    ranks = sum(r.numel() * r.element_size() for r in getattr(live, "_ranks", {}).values()) / gib
    print(f"  setup (load live model, cache sources, rank |task vectors|): {setup_s:.1f} s; cache "
          f"{cached:.2f} GiB (base + task vectors) + {ranks:.2f} GiB (int32 ranks)", flush=True)

    rows = []
    for method, density in (("task_arithmetic", None), ("ties", 0.5)):
        mem, disk = [], []
        for r in range(args.repeat):
            recipe = _layer_recipe(method, base, experts, r + 1, num_layers, density)
            mem.append(live.apply(recipe))
            print(f"  {method} candidate {r}: in memory {mem[-1]:.2f} s", flush=True)
            out = Path(tempfile.mkdtemp(prefix="umm-bench-evolve-"))
            try:
                t1 = time.perf_counter()
                merge(recipe, out / "m", device=args.device, threads=args.threads)
                loaded = load_causal_lm(out / "m", device=args.device, dtype=args.dtype)
                disk.append(time.perf_counter() - t1)
                print(f"  {method} candidate {r}: merge to disk + reload {disk[-1]:.2f} s", flush=True)
                del loaded
            finally:
                shutil.rmtree(out, ignore_errors=True)
            if method == "ties" and r + 1 >= min(args.repeat, 2):
                break  # TIES is slow on a small CPU; two candidates are enough for the ratio
        m, d = statistics.median(mem), statistics.median(disk)
        rows.append([method, len(mem), f"{m:.2f}", f"{d:.2f}", f"{d / m:.1f}x"])
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    console.print(table(
        f"one candidate, {n_params / 1e6:.0f}M params (setup once: load + cache {setup_s:.1f} s)",
        ["method", "candidates", "in memory s (median)", "merge to disk + reload s", "speed-up"],
        rows,
    ))


def part_split(args: argparse.Namespace) -> None:
    from umm.errors import UmmError
    from umm.evolve.config import parse_config
    from umm.evolve.run import run_evolve
    from umm.experts.build import load_suite
    from umm.ui import console, table

    try:
        suite = load_suite(args.variant or "full", args.suite_root)
    except UmmError as exc:
        console.print(f"skipped: {exc}")
        return
    math_m, code_m = suite.expert_for("math"), suite.expert_for("code")
    base = suite.base_of(math_m)
    math_m, code_m, base = (str(suite.path(n)) for n in (math_m, code_m, base))
    cfg = parse_config({
        "models": [math_m, code_m], "base_model": base,
        "method": "task_arithmetic", "tasks": [
            {"name": "synth-math", "search_size": args.search_size},
            {"name": "synth-code", "search_size": args.search_size},
        ],
        "population": 4, "budget": {"evaluations": 1 + 4 * args.generations},
        "device": args.device, "write_model": False, "compare": False,
    })
    run_dir = Path(tempfile.mkdtemp(prefix="umm-bench-split-"))
    try:
        run_evolve(cfg, run_dir)
        rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    total = sum(r["seconds"] for r in rows)
    apply = sum(r["apply_seconds"] for r in rows)
    console.print(table(
        f"candidate time on the tiny experts ({args.variant or 'full'}, {suite.root}), {len(rows)} candidates, "
        f"{args.search_size} search items per task",
        ["", "seconds per candidate", "share"],
        [
            ["apply (in memory)", f"{apply / len(rows):.3f}", f"{100 * apply / total:.1f}%"],
            ["evaluate (search split)", f"{(total - apply) / len(rows):.3f}", f"{100 * (total - apply) / total:.1f}%"],
            ["total", f"{total / len(rows):.3f}", "100%"],
        ],
    ))


def _search_rate(cfg, tasks, genome, transform, evaluate, generations: int):
    """Run ``generations`` CMA-ES generations with ``evaluate``; (candidates, seconds, fitnesses)."""
    import numpy as np

    from umm.evolve.search import run_search
    from umm.evolve.state import SearchState

    z0 = transform.to_unbounded(np.asarray(genome.to_vector(), dtype=np.float64))
    state = SearchState(optimizer="cma", seed=cfg.seed, dimension=transform.dimension, population=cfg.population,
                        sigma0=cfg.sigma0, z0=[float(v) for v in z0])
    t0 = time.perf_counter()
    run_search(state, transform, evaluate, generations=generations)
    seconds = time.perf_counter() - t0
    fitness = [c.fitness for g in state.generations for c in g.candidates]
    return len(fitness), seconds, fitness


def _ray_bench_search(args: argparse.Namespace):
    """The ray part's config, tasks, genome and bounds (``None`` if the suite is not built)."""
    from umm.checkpoints.reader import Checkpoint
    from umm.errors import UmmError
    from umm.evolve.config import parse_config
    from umm.evolve.run import check_tasks, gene_bounds, start_genome
    from umm.experts.build import load_suite
    from umm.ui import console

    try:
        suite = load_suite(args.variant or "small", args.suite_root)
    except UmmError as exc:
        console.print(f"skipped: {exc}")
        return None
    math_m, code_m = suite.expert_for("math"), suite.expert_for("code")
    cfg = parse_config({
        "models": [str(suite.path(math_m)), str(suite.path(code_m))], "base_model": str(suite.path(suite.base_of(math_m))),
        "method": "task_arithmetic", "tasks": [{"name": "synth-math", "search_size": args.search_size}],
        "population": args.population, "budget": {"evaluations": 1 + args.population * args.generations},
        "device": "cpu", "write_model": False, "compare": False, "seed": 0, "ray_threads": 1,
    })
    tasks = check_tasks(cfg)
    with Checkpoint.open(cfg.base_model) as ck:
        genome = start_genome(cfg, ck.num_layers or 0)
    return cfg, tasks, genome, gene_bounds(genome, cfg)


def part_ray_serial(args: argparse.Namespace) -> None:
    """The serial search of the ray part, run in a process of its own (see :func:`part_ray`);
    writes ``{setup_s, candidates, seconds, fitness}`` to ``--out``."""
    import numpy as np
    import torch

    from umm.atomic import write_json_atomic
    from umm.evolve.run import Worker, make_evaluator

    cfg, tasks, genome, transform = _ray_bench_search(args)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    worker = Worker(cfg, genome, tasks, "cpu")
    worker.score(np.asarray(genome.to_vector(), dtype=np.float64))  # warm-up: a process's first candidate is slower
    setup = time.perf_counter() - t0
    n, seconds, fitness = _search_rate(cfg, tasks, genome, transform, make_evaluator([worker]), args.generations)
    write_json_atomic(Path(args.out), {"setup_s": setup, "candidates": n, "seconds": seconds, "fitness": fitness})


def part_ray(args: argparse.Namespace) -> float | None:
    import os
    import subprocess

    import numpy as np

    from umm.evolve.ray_pool import RayPool, local_cluster
    from umm.ui import console, table

    found = _ray_bench_search(args)
    if found is None:
        return None
    cfg, tasks, genome, transform = found
    # every evaluation runs in processes started alike: a session of their own (the kernel's
    # autogroup scheduling shares the CPUs between sessions) and one OpenMP/torch thread
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)}
    x0 = np.asarray(genome.to_vector(), dtype=np.float64)  # the warm-up candidate
    rows, rates, results = [], {}, {}

    def record(name: str, setup_s: float, n: int, seconds: float, fitness: list[float]) -> None:
        rate = n / seconds * 3600
        rates.setdefault(name.split(" (")[0], []).append(rate)
        results[name] = fitness
        load = "/".join(f"{v:.1f}" for v in os.getloadavg())
        rows.append([name, f"{setup_s:.1f}", str(n), f"{seconds:.1f}", f"{rate:,.0f}", load])
        print(f"  {name}: {n} candidates in {seconds:.1f} s ({rate:,.0f}/h), load average {load}", flush=True)

    def serial(when: str) -> None:
        with tempfile.TemporaryDirectory(prefix="umm-bench-ray-") as tmp:
            out = Path(tmp) / "serial.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--part", "ray-serial", "--out", str(out),
                   "--generations", str(args.generations), "--search-size", str(args.search_size),
                   "--population", str(args.population), *(["--variant", args.variant] if args.variant else []),
                   *(["--suite-root", args.suite_root] if args.suite_root else [])]
            subprocess.run(cmd, env=env, check=True, start_new_session=True, timeout=3600)
            r = json.loads(out.read_text())
        record(f"serial ({when})", r["setup_s"], r["candidates"], r["seconds"], r["fitness"])

    serial("before")
    for nodes in ((1,), (1, 1)):
        with local_cluster(nodes, env=env) as cluster:
            t0 = time.perf_counter()
            with RayPool.start(cfg, genome, tasks, address=cluster.address, actors=len(nodes), threads=1) as pool:
                pool.ray.get([a.score.remote(x0) for a in pool.actors])
                setup = time.perf_counter() - t0
                record(f"ray {len(nodes)} worker{'s' if len(nodes) > 1 else ''}", setup,
                       *_search_rate(cfg, tasks, genome, transform, pool.evaluator(), args.generations))
    serial("after")
    same = all(f == results["serial (before)"] for f in results.values())
    console.print(table(
        f"CMA-ES search on the tiny experts ({args.variant or 'small'}), population {args.population}, "
        f"{args.generations} generations + start point, synth-math x {args.search_size} search items, 1 torch "
        f"thread per worker, {os.cpu_count()} CPUs; the same fitness of every candidate in all: {'yes' if same else 'NO'}",
        ["evaluation", "set-up + warm-up s (once)", "candidates", "search s", "candidates/h", "load average 1/5/15 min"],
        rows,
    ))
    serial_rate = statistics.mean(rates["serial"])
    ratio1 = rates["ray 1 worker"][0] / serial_rate
    ratio = rates["ray 2 workers"][0] / serial_rate
    print(f"serial: mean of the runs before and after ({', '.join(f'{r:,.0f}' for r in rates['serial'])} per hour)")
    print(f"ray 1 worker / serial candidates per hour: {ratio1:.2f}")
    print(f"ray 2 workers / serial candidates per hour: {ratio:.2f}")
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["apply", "split", "ray", "ray-serial", "all"], default="all",
                    help="all: the apply and split parts (ray runs alone)")
    ap.add_argument("--repeat", type=int, default=3, help="candidates per method in the apply part")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="dtype of the live model")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (and merge workers); 1 on a shared, oversubscribed machine")
    ap.add_argument("--variant", default=None, help="tiny expert suite variant (default: full; the ray part: small)")
    ap.add_argument("--population", type=int, default=4, help="candidates per generation in the ray part")
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--suite-root", default=None, help="parent folder of the suite (default: umm's experts cache)")
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--search-size", type=int, default=16)
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.part in ("apply", "all"):
        part_apply(args)
    if args.part in ("split", "all"):
        part_split(args)
    if args.part == "ray":
        part_ray(args)
    if args.part == "ray-serial":  # the serial run of the ray part, in its own process
        part_ray_serial(args)


if __name__ == "__main__":
    main()
