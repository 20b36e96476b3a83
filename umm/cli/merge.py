"""``umm merge RECIPE.yaml OUT_DIR``: run a mergekit-style recipe with the streaming executor."""

from __future__ import annotations

from pathlib import Path

import typer

from umm.cli.common import PRIVATE_HELP, PUSH_HELP, push_output, user_errors
from umm.speedups import import_frozen, tune_allocator


def register(app: typer.Typer) -> None:
    """Add ``umm merge`` to the ``umm`` app."""
    app.command("merge")(merge_command)


def merge_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit format: models, base_model, merge_method, parameters, dtype, out_dtype, tokenizer_source)."),
    out_dir: Path = typer.Argument(..., help="Folder to write the merged model to (created atomically)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (cuda:N)."),
    threads: int = typer.Option(0, "--threads", help="Worker threads, also torch's thread count (0: automatic: up to 4 workers by CPU count, sharing the cores as torch threads)."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard, e.g. 5GB, 200MB."),
    overwrite: bool = typer.Option(False, "--overwrite/--no-overwrite", help="Replace OUT_DIR if it exists (only once the new model is complete)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of random methods (DARE, DELLA), as mergekit's --random-seed; default 0."),
    dry_run: bool = typer.Option(False, "--dry-run/--no-dry-run", help="Check the recipe and the models, print the plan, write nothing."),
    push_to_hub: str | None = typer.Option(None, "--push-to-hub", metavar="REPO", help=PUSH_HELP),
    private: bool = typer.Option(False, "--private/--no-private", help=PRIVATE_HELP),
) -> None:
    """Merge the models of RECIPE into OUT_DIR, one tensor at a time.

    Models are folders (relative paths are read from the current directory, as mergekit does),
    Hugging Face Hub ids (org/name, org/name@revision; downloaded into the hub cache, read from it
    when HF_HUB_OFFLINE=1) or MODEL+LORA_ADAPTER (the adapter applied in memory).
    """
    with user_errors():
        _merge(recipe, out_dir, device, threads, shard_size, overwrite, seed, dry_run, push_to_hub, private)


def _merge(recipe: Path, out_dir: Path, device: str, threads: int, shard_size: str, overwrite: bool,
           seed: int | None, dry_run: bool, push_to_hub: str | None = None, private: bool = False) -> None:
    from umm.errors import UmmError
    from umm.ui import Bars, console, human_bytes, table

    if device != "cpu" and not device.startswith("cuda"):
        raise UmmError(f"unknown --device {device!r}; valid: cpu, cuda, cuda:N")
    if threads < 0:
        raise UmmError("--threads must be >= 0")
    if not recipe.is_file():
        raise UmmError(f"recipe file not found: {recipe}")
    if push_to_hub is not None:
        from umm.checkpoints.hub import check_repo_id

        check_repo_id(push_to_hub)
    # torch, the methods, the checkpoint reader/writer: see umm.speedups.import_frozen
    import_frozen("umm.merge.disk", "umm.merge.recipe")
    from umm.merge.recipe import MergeRecipe

    rec = MergeRecipe.load(recipe)

    if dry_run:
        _dry_run(rec, out_dir, overwrite, shard_size, push_to_hub)
        return

    from umm.merge.disk import merge

    tune_allocator()
    s = merge(
        rec, out_dir, device=device, threads=threads or None, shard_size=shard_size,
        overwrite=overwrite, on_progress=Bars(), seed=seed,
    )
    rows = [
        ("output", str(s.out_dir)),
        ("method", s.method),
        ("models", "\n".join(s.models)),
        ("base model", s.base_model or "-"),
        ("tensors", s.num_tensors),
        ("output size", f"{human_bytes(s.output_bytes)} in {s.shards} shard(s), {s.out_dtype}"),
        ("time", f"{s.wall_s:.1f} s"),
        ("peak memory (RSS)", human_bytes(s.peak_rss_bytes)),
        ("device / threads", f"{s.device} / {s.threads}"),
    ]
    console.print(table("umm merge", ["", ""], rows))
    if push_to_hub:
        push_output(s.out_dir, push_to_hub, private, f"umm merge: {s.method} of {len(s.models)} models")


def _dry_run(rec, out_dir: Path, overwrite: bool, shard_size: str, push_to_hub: str | None = None) -> None:
    from umm.checkpoints.writer import TensorSpec, check_output_dir, parse_size, plan_shards
    from umm.merge.disk import prepare_extras
    from umm.merge.inputs import open_inputs
    from umm.ui import Bars, console, human_bytes, table

    check_output_dir(out_dir, overwrite)
    inputs = open_inputs(rec, on_progress=Bars())
    try:
        extras = prepare_extras(inputs, rec)  # the chat template and the card are checked too
        specs = [TensorSpec(n, inputs.out_dtypes[n], inputs.shapes[n]) for n in inputs.tensor_names]
        plan = plan_shards(specs, parse_size(shard_size))
        rows = [
            ("method", inputs.method.name),
            ("models", "\n".join(inputs.names)),
            ("tensors", len(specs)),
            ("output size", f"{human_bytes(plan.total_tensor_bytes)} in {len(plan.files)} shard(s)"),
            ("would write", str(out_dir)),
            ("and", ", ".join(sorted({*extras.texts, *(name for _, name in extras.copies)}))),
            *([("would push to", push_to_hub)] if push_to_hub else []),
        ]
        console.print(table("umm merge --dry-run (nothing written)", ["", ""], rows))
    finally:
        inputs.close()
