"""``umm demo``: build a tiny base and two experts, merge them with TIES, load and run the result.

The whole job runs on CPU in well under a minute and is idempotent: models already built under
the work folder are reused; the merged model is rebuilt each time (atomically replaced).
"""

from __future__ import annotations

import logging
import shutil
import secrets
from pathlib import Path

import typer

logger = logging.getLogger(__name__)

DEMO_RECIPE = """\
# Written by `umm demo`: a mergekit-style TIES recipe (runs unchanged in mergekit-yaml).
merge_method: ties
base_model: {base}
models:
  - model: {math}
    parameters:
      weight: 0.5
      density: 0.5
  - model: {code}
    parameters:
      weight: 0.5
      density: 0.5
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
"""


def register(app: typer.Typer) -> None:
    """Add ``umm demo`` to the ``umm`` app."""
    app.command("demo")(demo_command)


def _ensure_model(path: Path, **kwargs) -> bool:
    """Build a random Llama at ``path`` unless a readable one is there; True if built now."""
    from umm.checkpoints.reader import Checkpoint
    from umm.errors import UmmError
    from umm.experts.random_models import make_random_llama

    if path.is_dir():
        try:
            Checkpoint.open(path).close()
            return False
        except UmmError:
            logger.warning("rebuilding unreadable demo model %s", path)
    tmp = path.parent / f".{path.name}.partial-{secrets.token_hex(4)}"
    try:
        make_random_llama(tmp, **kwargs)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def demo_command(
    workdir: Path = typer.Option(Path("umm-demo"), "--workdir", help="Folder for the demo's models and recipe."),
    threads: int = typer.Option(0, "--threads", help="Merge threads (0: automatic)."),
) -> None:
    """Build a tiny base + math + code expert, TIES-merge them, load the result and run it."""
    from umm.cli.common import user_errors

    with user_errors():
        _demo(workdir, threads)


def _demo(workdir: Path, threads: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from umm.merge.executor import merge
    from umm.merge.recipe import MergeRecipe
    from umm.ui import console, human_bytes, table

    root = workdir.absolute()
    root.mkdir(parents=True, exist_ok=True)
    base, math_, code = root / "base", root / "math-expert", root / "code-expert"
    shape = dict(hidden_size=128, num_layers=4, vocab_size=384)
    built = [
        _ensure_model(base, seed=0, **shape),
        _ensure_model(math_, seed=1, base=base),
        _ensure_model(code, seed=2, base=base),
    ]
    console.print(
        f"models: {'built' if any(built) else 'reused'} a random Llama base (hidden 128, 4 layers) "
        f"and two experts (base + noise) under {root}"
    )
    recipe_path = root / "ties.yaml"
    recipe_path.write_text(DEMO_RECIPE.format(base=base, math=math_, code=code), encoding="utf-8")
    out = root / "merged"
    summary = merge(MergeRecipe.load(recipe_path), out, threads=threads or None, overwrite=True)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(out, trust_remote_code=False)
    prompt = "Question: Tom has 3 apples and buys 4 more."
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    next_id = int(logits[0, -1].argmax())
    console.print(table("umm demo", ["", ""], [
        ("recipe", str(recipe_path)),
        ("merged model", str(out)),
        ("method", f"{summary.method} ({len(summary.models) - 1} experts onto the base)"),
        ("tensors / size", f"{summary.num_tensors} / {human_bytes(summary.output_bytes)} ({summary.out_dtype})"),
        ("merge time / peak RSS", f"{summary.wall_s:.2f} s / {human_bytes(summary.peak_rss_bytes)}"),
        ("forward pass", f"{tuple(ids.shape)} tokens -> logits {tuple(logits.shape)}, "
                         f"finite={bool(torch.isfinite(logits).all())}, next token id {next_id}"),
    ]))
    console.print(f"Run it again with: umm merge {recipe_path} {out} --overwrite")
