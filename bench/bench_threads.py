"""Bench: wall time of a whole ``umm eval`` process per torch thread setting, idle and under load.

Why: on a small machine whose cores are busy, torch's default (one intra-op thread per core)
makes every parallel region wait for a thread that the OS has descheduled, and OpenMP spins
(busy-waits) while it waits, so a tiny model's generation can take 10-100x longer than on one
thread. The default now comes from ``umm.cli.common.default_threads``; this script shows what
each setting costs.

For each setting it runs ``umm eval MODEL --task ... --limit N --device cpu`` as a separate
process ``--repeat`` times (settings alternate), with ``--burners`` pure-Python CPU burners
running (``python -c "while True: pass"``, killed at the end), and prints the median and spread
of the process wall time and of the evaluation time (the tasks' own ``seconds``, without
Python start-up and imports), plus the scores (they must not depend on the setting).

    python bench/bench_threads.py --model ~/.cache/umm/experts/small/math
    python bench/bench_threads.py --model DIR --burners 0      # idle machine
    python bench/bench_threads.py --model DIR --settings "default,--threads 1,--threads 2"

Settings: ``default`` (no ``--threads``: the default of this tree), ``--threads N``, and
``env:NAME=VALUE`` (no ``--threads``, with that environment variable, e.g. ``env:OMP_WAIT_POLICY=PASSIVE``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(model: Path, setting: str, tasks: str, limit: int, out: Path) -> tuple[float, float, dict[str, float]]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["UMM_NO_PROGRESS"] = "1"
    args: list[str] = []
    if setting.startswith("env:"):
        name, _, value = setting[4:].partition("=")
        env[name] = value
    elif setting != "default":
        args = shlex.split(setting)
    cmd = [sys.executable, "-c", "from umm.cli import console_main; console_main()", "eval", str(model), "--task", tasks, "--limit", str(limit),
           "--device", "cpu", "--output", str(out), *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: umm eval failed:\n{proc.stderr[-2000:]}")
    scores = json.loads(out.read_text())["scores"]
    return wall, sum(s["seconds"] for s in scores.values()), {t: s["score"] for t, s in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--tasks", default="synth-math,synth-code")
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--burners", type=int, default=2, help="pure-Python CPU burners running meanwhile")
    ap.add_argument("--settings", default="default,--threads 1,--threads 2,env:OMP_WAIT_POLICY=PASSIVE")
    args = ap.parse_args()
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    results: dict[str, list[tuple[float, float]]] = {s: [] for s in settings}
    scores: dict[str, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.repeat):
                order = settings if r % 2 == 0 else settings[::-1]
                for s in order:
                    wall, ev, sc = _run(args.model, s, args.tasks, args.limit, Path(tmp) / "r.json")
                    results[s].append((wall, ev))
                    scores[s] = sc
    finally:
        for b in burners:
            b.send_signal(signal.SIGTERM)
        for b in burners:
            b.wait(timeout=10)

    print(f"umm eval {args.model} --task {args.tasks} --limit {args.limit}; {args.burners} CPU burners; "
          f"{os.cpu_count()} CPUs; {args.repeat} runs each (median [min, max])")
    print(f"{'setting':<32} {'process wall s':>26} {'evaluation s':>26}  scores")
    for s in settings:
        walls = [w for w, _ in results[s]]
        evs = [e for _, e in results[s]]
        print(f"{s:<32} {statistics.median(walls):>8.2f} [{min(walls):6.2f}, {max(walls):6.2f}]"
              f" {statistics.median(evs):>8.2f} [{min(evs):6.2f}, {max(evs):6.2f}]  "
              + ", ".join(f"{t}={v:.3f}" for t, v in scores[s].items()))


if __name__ == "__main__":
    main()
