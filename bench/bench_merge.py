"""Bench: `umm merge` against `mergekit-yaml` on the same recipes, whole process, side by side.

Builds (once, cached under ``bench/out/models``) a seeded ~220M-parameter bf16 Llama-shaped base
(hidden 1024, 12 layers, vocab 32000, sharded at 200 MB) and three experts (base + noise), writes
two recipes (linear 0.4/0.3/0.3; TIES density 0.5 with normalize), then runs each tool as a
separate process and measures its wall time and peak RSS (``os.wait4`` rusage of the child: the
kernel's own high-water mark, no polling). Every output tensor of umm is compared with
mergekit's: the largest difference is reported in bf16 ulps of mergekit's value.
umm's modules are byte-compiled first, as mergekit's were when pip installed them.

    python bench/bench_merge.py                      # both methods, 1 run each
    python bench/bench_merge.py --repeat 3           # best and spread of 3 runs
    python bench/bench_merge.py --mergekit-yaml /tmp/mergekit-venv/bin/mergekit-yaml
    UMM_SPEEDUPS=0 python bench/bench_merge.py       # umm without its speed tricks (umm.speedups)

mergekit is skipped with a message when its executable is missing (create it with
``python3 -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install torch==2.13.0 &&
/tmp/mergekit-venv/bin/pip install mergekit``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MERGEKIT = Path("/tmp/mergekit-venv/bin/mergekit-yaml")

RECIPES = {
    "linear": """\
merge_method: linear
models:
  - model: {e1}
    parameters: {{weight: 0.4}}
  - model: {e2}
    parameters: {{weight: 0.3}}
  - model: {e3}
    parameters: {{weight: 0.3}}
dtype: {dtype}
out_dtype: bfloat16
""",
    "ties": """\
merge_method: ties
base_model: {base}
models:
  - model: {e1}
    parameters: {{weight: 0.4, density: 0.5}}
  - model: {e2}
    parameters: {{weight: 0.3, density: 0.5}}
  - model: {e3}
    parameters: {{weight: 0.3, density: 0.5}}
parameters:
  normalize: true
dtype: {dtype}
out_dtype: bfloat16
""",
}


@dataclass
class Run:
    tool: str
    method: str
    wall_s: float
    cpu_s: float
    peak_rss: int
    ok: bool
    log: str


def build_models(root: Path) -> dict[str, Path]:
    """The base and three experts, built once (atomically) and reused."""
    import torch

    from umm.experts.random_models import make_random_llama

    paths = {"base": root / "base", "e1": root / "expert1", "e2": root / "expert2", "e3": root / "expert3"}
    for i, (key, path) in enumerate(paths.items()):
        if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            continue
        tmp = path.parent / f".{path.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        if key == "base":
            make_random_llama(tmp, seed=0, hidden_size=1024, num_layers=12, num_heads=16,
                              vocab_size=32000, dtype=torch.bfloat16, max_shard_size="200MB")
        else:
            make_random_llama(tmp, seed=i, base=paths["base"], dtype=torch.bfloat16,
                              max_shard_size="200MB")
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        print(f"built {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int, int, str]:
    """Run ``cmd``; return (wall s, CPU s (user + system), peak RSS bytes of the child, exit code,
    last output). CPU seconds barely depend on what else the machine runs; wall time does."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = proc.stdout.read() if proc.stdout else b""  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, int(usage.ru_maxrss) * 1024, proc.returncode, out.decode(errors="replace")[-3000:]


def umm_cmd(recipe: Path, out: Path, threads: int | None) -> list[str]:
    exe = Path(sys.executable).parent / "umm"
    base = [str(exe)] if exe.exists() else [sys.executable, "-c", "from umm.cli import console_main; console_main()"]
    cmd = base + ["merge", str(recipe), str(out), "--overwrite"]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def byte_compile_umm() -> None:
    """Write the bytecode of umm's modules, as a (non-editable) ``pip install`` does.

    mergekit's modules were compiled when pip installed them; an editable umm checkout run under
    ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile its own on every run (~0.13 s).
    """
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("umm")
    for folder in spec.submodule_search_locations if spec and spec.submodule_search_locations else []:
        compileall.compile_dir(folder, quiet=1)


def mergekit_cmd(exe: Path, recipe: Path, out: Path) -> list[str]:
    return [str(exe), str(recipe), str(out)]


def compare(ours: Path, theirs: Path) -> str:
    """Largest difference over every tensor, in bf16 ulps of mergekit's value."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, tuple[Path, str]]:
        where = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    where[k] = (f, k)
        return where

    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        return f"tensor names differ: only umm {sorted(set(a) - set(b))[:3]}, only mergekit {sorted(set(b) - set(a))[:3]}"
    worst_ulp, worst_name, worst_abs, n_diff, n_far = 0.0, "", 0.0, 0, 0
    total = 0
    for name in sorted(a):
        with safe_open(str(a[name][0]), "pt") as h:
            x = h.get_tensor(name)
        with safe_open(str(b[name][0]), "pt") as h:
            y = h.get_tensor(name)
        if x.shape != y.shape:
            return f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        x32, y32 = x.float(), y.float()
        diff = (x32 - y32).abs()
        # one bf16 ulp at |y| (8 significant bits): 2^(e - 8) for |y| = m * 2^e, 0.5 <= m < 1;
        # floored at the ulp of bf16's smallest normal number
        e = torch.frexp(y32.abs().clamp_min(2.0**-125)).exponent
        ulps = diff / torch.ldexp(torch.ones_like(y32), e - 8)
        total += x.numel()
        n_diff += int((diff > 0).sum())
        n_far += int((ulps > 1).sum())
        m = float(ulps.max()) if ulps.numel() else 0.0
        if m > worst_ulp:
            worst_ulp, worst_name, worst_abs = m, name, float(diff.max())
    if worst_ulp == 0:
        return "bit-identical"
    verdict = "equal to bf16 rounding" if worst_ulp <= 1.0 else f"differ beyond bf16 rounding (worst {worst_name})"
    return (f"{verdict}: max {worst_ulp:.2f} bf16 ulp (abs {worst_abs:.2e}); {n_diff / max(1, total):.3%} of "
            f"values differ, {n_far / max(1, total):.4%} by more than 1 ulp")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "out", help="work folder (models, recipes, outputs)")
    ap.add_argument("--mergekit-yaml", type=Path, default=DEFAULT_MERGEKIT)
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method (best and spread reported)")
    ap.add_argument("--threads", type=int, default=0, help="umm --threads (0: automatic)")
    ap.add_argument("--dtype", default="bfloat16", help="recipe `dtype` (mergekit's compute dtype)")
    ap.add_argument("--skip-umm", action="store_true")
    ap.add_argument("--compare-only", action="store_true", help="only compare the outputs already in --out")
    args = ap.parse_args()

    root = args.out.absolute()
    if args.compare_only:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            print(method, compare(root / f"umm-{method}", root / f"mergekit-{method}"))
        return
    models = build_models(root / "models")
    if not args.skip_umm:
        byte_compile_umm()
    have_mk = args.mergekit_yaml.exists()
    if not have_mk:
        print(f"mergekit not found at {args.mergekit_yaml}: skipping it (see the module docstring)")
    env = dict(os.environ, UMM_NO_PROGRESS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    runs: list[Run] = []
    verdicts: dict[str, str] = {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        recipe = root / f"{method}.yaml"
        recipe.write_text(RECIPES[method].format(dtype=args.dtype, **{k: str(v) for k, v in models.items()}))
        out_umm, out_mk = root / f"umm-{method}", root / f"mergekit-{method}"
        for rep in range(args.repeat):
            # alternate the order so page-cache warmth and neighbours' load are shared fairly
            order = ["umm", "mergekit"] if rep % 2 == 0 else ["mergekit", "umm"]
            for tool in order:
                load = os.getloadavg()[0]
                if tool == "umm" and not args.skip_umm:
                    shutil.rmtree(out_umm, ignore_errors=True)  # as for mergekit: no old output to delete
                    wall, cpu, rss, rc, log = run_measured(umm_cmd(recipe, out_umm, args.threads), env)
                elif tool == "mergekit" and have_mk:
                    shutil.rmtree(out_mk, ignore_errors=True)
                    wall, cpu, rss, rc, log = run_measured(mergekit_cmd(args.mergekit_yaml, recipe, out_mk), env)
                else:
                    continue
                runs.append(Run(tool, method, wall, cpu, rss, rc == 0, log))
                print(f"{tool:9s} {method:7s} run {rep + 1}: {wall:6.2f} s wall  {cpu:6.2f} s CPU  {rss / 1e9:5.2f} GB"
                      f"  (load {load:.1f})"
                      + ("" if rc == 0 else f"  FAILED (exit {rc})\n{log}"), flush=True)
        if have_mk and not args.skip_umm and (out_umm / "config.json").exists() and (out_mk / "config.json").exists():
            verdicts[method] = compare(out_umm, out_mk)

    print()
    header = (f"{'tool':9s} {'method':7s} {'wall s (best)':>13s} {'spread':>13s} {'CPU s':>7s} {'peak RSS':>9s} "
              f"{'time ratio':>10s} {'CPU ratio':>9s} {'RSS ratio':>9s}")
    print(header)
    print("-" * len(header))
    summary = {}
    for method in dict.fromkeys(r.method for r in runs):
        best = {}
        for tool in ("umm", "mergekit"):
            rs = [r for r in runs if r.tool == tool and r.method == method and r.ok]
            if not rs:
                continue
            walls = [r.wall_s for r in rs]
            best[tool] = (min(walls), max(walls), min(r.peak_rss for r in rs), max(r.peak_rss for r in rs),
                          min(r.cpu_s for r in rs))
        for tool, (wmin, wmax, rmin, _rmax, cmin) in best.items():
            tr = cr = rr = ""
            if tool == "umm" and "mergekit" in best:
                tr = f"{wmin / best['mergekit'][0]:.2f}x"
                cr = f"{cmin / best['mergekit'][4]:.2f}x"
                rr = f"{rmin / best['mergekit'][2]:.2f}x"
            spread = f"{wmin:.1f}-{wmax:.1f}" if args.repeat > 1 else "-"
            print(f"{tool:9s} {method:7s} {wmin:13.2f} {spread:>13s} {cmin:7.2f} {rmin / 1e9:8.2f}G "
                  f"{tr:>10s} {cr:>9s} {rr:>9s}")
        summary[method] = {t: {"wall_best_s": v[0], "wall_worst_s": v[1], "peak_rss_best": v[2],
                               "peak_rss_worst": v[3], "cpu_best_s": v[4]} for t, v in best.items()}
        if method in verdicts:
            print(f"{'':9s} {method:7s} outputs: {verdicts[method]}")
            summary[method]["outputs"] = verdicts[method]
    (root / "bench_merge.json").write_text(json.dumps(summary, indent=2))
    print(f"\nraw figures: {root / 'bench_merge.json'}  ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    if any(not r.ok for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
