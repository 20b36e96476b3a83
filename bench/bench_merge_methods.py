"""Bench: umm's newer merge methods against mergekit's, tensor by tensor, on the same fp32 inputs.

Builds four tiny seeded fp32 Llama folders (a base and three experts of it: 4 layers, hidden 64,
vocab 256) in a temporary folder, writes one recipe per method (passthrough frankenmerge with
two slices, model_stock, sce with select_topk 0.5, nuslerp with a base, karcher, arcee_fusion,
plus two recipes with the features of mergekit's examples: a two-slice stacked slerp with
filtered ``t`` gradients, and TIES with density / weight gradients and a filter rule),
runs each through ``mergekit-yaml`` (a subprocess from the venv that has mergekit: fp32 in and
out, CPU, no tokenizer copy, no model card) and through umm (``umm.merge.disk.merge``, in this
process), and prints, per method, the worst absolute difference over every output tensor and
which tensor it is; the last line is machine-readable::

    worst |umm - mergekit| per method: passthrough=0, model_stock=..., ...

This script installs nothing. mergekit lives in its own venv, e.g.::

    python -m venv /work/venv-mergekit && /work/venv-mergekit/bin/pip install torch==2.13.0 mergekit
    python bench/bench_merge_methods.py --mergekit-yaml /work/venv-mergekit/bin/mergekit-yaml

DARE and DELLA are not here: mergekit draws their masks from torch's global generator, umm
from a per-tensor seeded one, so their tensors cannot agree (their statistics are tested in
tests/test_merge_methods_new.py instead).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_MERGEKIT = os.environ.get("UMM_MERGEKIT_YAML", "/work/venv-mergekit/bin/mergekit-yaml")

RECIPES = {
    "passthrough": """\
slices:
  - sources:
    - model: {a}
      layer_range: [0, 3]
  - sources:
    - model: {b}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float32
""",
    "model_stock": """\
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: model_stock
base_model: {base}
dtype: float32
""",
    "sce": """\
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: sce
base_model: {base}
parameters:
  select_topk: 0.5
dtype: float32
""",
    "nuslerp": """\
models:
  - model: {a}
    parameters: {{weight: 0.4}}
  - model: {b}
    parameters: {{weight: 0.6}}
merge_method: nuslerp
base_model: {base}
dtype: float32
""",
    "karcher": """\
models:
  - model: {a}
  - model: {b}
  - model: {c}
merge_method: karcher
dtype: float32
""",
    "arcee_fusion": """\
models:
  - model: {a}
  - model: {b}
merge_method: arcee_fusion
base_model: {a}
dtype: float32
""",
    # recipe features of mergekit's examples, on the slices/gradient machinery (not new methods)
    "slerp_slices": """\
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [0, 2]}}
  - sources:
      - {{model: {a}, layer_range: [1, 4]}}
      - {{model: {b}, layer_range: [1, 4]}}
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "ties_gradients": """\
models:
  - model: {a}
    parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}
  - model: {b}
    parameters: {{density: 0.5, weight: [0, 0.3, 0.7, 1]}}
  - model: {c}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: {base}
parameters: {{normalize: true, int8_mask: true}}
dtype: float32
""",
}


def make_models(root: Path) -> dict[str, Path]:
    """A seeded fp32 base and three experts of it (base + noise)."""
    from umm.experts.random_models import make_random_llama

    base = make_random_llama(root / "base", seed=0, num_layers=4, hidden_size=64, vocab_size=256)
    out = {"base": base}
    for i, name in enumerate(("a", "b", "c")):
        out[name] = make_random_llama(root / name, seed=i + 1, base=base, noise=0.05)
    return out


def read_folder(folder: Path) -> dict:
    """Every tensor of a safetensors model folder."""
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_mergekit(exe: str, recipe: Path, out: Path) -> None:
    cmd = [exe, str(recipe), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--device", "cpu",
           "--allow-crimes", "--out-shard-size", "1B"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if res.returncode != 0:
        raise SystemExit(f"mergekit-yaml failed on {recipe.name}:\n{res.stderr[-3000:]}")


def compare(umm_dir: Path, mk_dir: Path) -> tuple[float, str, int]:
    """(worst |umm − mergekit|, the tensor where it is, number of tensors); a missing tensor or a
    different layer count is an error."""
    a, b = read_folder(umm_dir), read_folder(mk_dir)
    if set(a) != set(b):
        raise SystemExit(f"tensor names differ: only umm {sorted(set(a) - set(b))[:4]}, "
                         f"only mergekit {sorted(set(b) - set(a))[:4]}")
    layers = [json.loads((d / "config.json").read_text()).get("num_hidden_layers") for d in (umm_dir, mk_dir)]
    if layers[0] != layers[1]:
        raise SystemExit(f"num_hidden_layers differ: umm {layers[0]}, mergekit {layers[1]}")
    worst, where = 0.0, ""
    for name in sorted(a):
        if a[name].shape != b[name].shape:
            raise SystemExit(f"{name}: shape {tuple(a[name].shape)} (umm) vs {tuple(b[name].shape)} (mergekit)")
        d = float((a[name].double() - b[name].double()).abs().max()) if a[name].numel() else 0.0
        if d > worst or not where:
            worst, where = d, name
    return worst, where, len(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit-yaml", default=DEFAULT_MERGEKIT, help="mergekit-yaml of a venv with mergekit")
    ap.add_argument("--methods", default=",".join(RECIPES), help="comma-separated subset")
    args = ap.parse_args()
    exe = shutil.which(args.mergekit_yaml) or args.mergekit_yaml
    if not Path(exe).exists():
        raise SystemExit(f"mergekit-yaml not found at {exe}; install mergekit in a separate venv (see the docstring)")
    from umm.merge import MergeRecipe
    from umm.merge.disk import merge

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="umm-bench-methods-") as tmp:
        root = Path(tmp)
        models = make_models(root / "models")
        for method in args.methods.split(","):
            text = RECIPES[method].format(**{k: str(v) for k, v in models.items()})
            recipe = root / f"{method}.yml"
            recipe.write_text(text)
            mk_out, umm_out = root / f"mk-{method}", root / f"umm-{method}"
            run_mergekit(exe, recipe, mk_out)
            merge(MergeRecipe.from_yaml(text), umm_out, threads=1)
            worst, where, n = compare(umm_out, mk_out)
            results[method] = worst
            at = f"({where})" if worst > 0 else "(every tensor bit-identical)"
            print(f"{method:14s} {n:3d} tensors  worst |umm - mergekit| = {worst:.3g}  {at}", flush=True)
    line = ", ".join(f"{m}={v:.3g}" for m, v in results.items())
    print(f"worst |umm - mergekit| per method: {line}")


if __name__ == "__main__":
    sys.exit(main())
