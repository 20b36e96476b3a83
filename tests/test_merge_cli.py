"""``umm merge`` through the typer app (``typer.testing.CliRunner``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from subprocs import ctrl_c_default
from typer.testing import CliRunner

from umm.cli import app

runner = CliRunner()


def _write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture()
def ties_recipe(tiny_models, tmp_path) -> Path:
    return _write_recipe(tmp_path / "ties.yaml", f"""\
merge_method: ties
base_model: {tiny_models['base']}
models:
  - model: {tiny_models['base']}
  - model: {tiny_models['math']}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {tiny_models['code']}
    parameters: {{weight: 0.5, density: 0.5}}
parameters:
  normalize: true
dtype: float32
out_dtype: bfloat16
tokenizer_source: base
""")


def test_merge_command_writes_loadable_model_and_prints_summary(ties_recipe, tmp_path):
    out = tmp_path / "merged"
    res = runner.invoke(app, ["merge", str(ties_recipe), str(out), "--threads", "2", "--shard-size", "60KB"])
    assert res.exit_code == 0, res.output
    for word in ("ties", "tensors", "peak memory", "time", "output size", "shard(s)"):
        assert word in res.output
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True, trust_remote_code=False)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits.float()).all()


def test_relative_model_paths_resolve_from_cwd(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_models["base"].parent)
    recipe = _write_recipe(tmp_path / "rel.yaml", """\
merge_method: task_arithmetic
base_model: base
models:
  - model: math
    parameters: {weight: 0.5}
""")
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_dry_run_writes_nothing(ties_recipe, tmp_path):
    out = tmp_path / "dry"
    res = runner.invoke(app, ["merge", str(ties_recipe), str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "nothing written" in res.output and not out.exists()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("merge_method: ties", "merge_method: tiez"), "valid"),
        (lambda t: t.replace("density: 0.5}", "densty: 0.5}", 1), "densty"),
        (lambda t: t.replace("dtype: float32", "dtype: float7"), "float7"),
        (lambda t: t.replace("/math", "/no-such-model"), "no-such-model"),
    ],
    ids=["unknown-method", "unknown-parameter", "bad-dtype", "missing-model"],
)
def test_bad_recipe_exits_2_with_message(ties_recipe, tmp_path, edit, message):
    bad = _write_recipe(tmp_path / "bad.yaml", edit(ties_recipe.read_text()))
    res = runner.invoke(app, ["merge", str(bad), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in res.output
    assert "Traceback" not in res.output and not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_bad_options(ties_recipe, tmp_path):
    out = tmp_path / "out"
    assert runner.invoke(app, ["merge", str(ties_recipe), str(out)]).exit_code == 0
    res = runner.invoke(app, ["merge", str(ties_recipe), str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert runner.invoke(app, ["merge", str(ties_recipe), str(out), "--overwrite"]).exit_code == 0
    res = runner.invoke(app, ["merge", str(ties_recipe), str(tmp_path / "o2"), "--device", "tpu"])
    assert res.exit_code == 2 and "cpu" in res.output
    res = runner.invoke(app, ["merge", str(ties_recipe), str(tmp_path / "o2"), "--shard-size", "huge"])
    assert res.exit_code == 2 and "shard size" in res.output
    res = runner.invoke(app, ["merge", str(tmp_path / "nope.yaml"), str(tmp_path / "o2")])
    assert res.exit_code == 2 and "nope.yaml" in res.output



def test_merge_imports_torch_with_gc_frozen_and_leaves_gc_on():
    # in a fresh interpreter (here torch is already imported, so the CLI skips this step)
    import subprocess
    import sys

    code = ("import gc, sys; from umm.speedups import import_frozen; "
            "import_frozen('umm.merge.disk', 'umm.merge.recipe'); "
            "assert 'torch' in sys.modules and 'umm.merge.disk' in sys.modules; "
            "assert gc.isenabled() and gc.get_freeze_count() > 100_000, gc.get_freeze_count()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# A merge that is certainly still running when the signal comes, on any machine: every block
# written waits 0.3 s (a slow disk), so a 2-layer model's ~20 blocks take seconds on one thread.
_SLOW_MERGE = """\
import time
from umm.checkpoints.writer import CheckpointWriter
_write = CheckpointWriter.write_rows
def _slow(self, *args, **kwargs):
    _write(self, *args, **kwargs)
    time.sleep(0.3)
CheckpointWriter.write_rows = _slow
from umm.cli import console_main
console_main()
"""


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


@pytest.mark.parametrize(("sig", "status"), [("SIGTERM", 128 + 15), ("SIGINT", 128 + 2)])
def test_a_killed_merge_leaves_no_partial_folder(ties_recipe, tmp_path, sig, status):
    """SIGTERM (``kill PID``) removes the hidden partial output as Ctrl-C does, and says so by its status."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "merged"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_MERGE, "merge", str(ties_recipe), str(out), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    try:
        deadline = time.monotonic() + 120  # start-up imports torch: slow on a loaded machine
        while not _partials(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _partials(out) and proc.poll() is None, proc.communicate(timeout=60)
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == status, err
    assert "Traceback" not in err
    assert _partials(out) == [] and not out.exists()


def test_a_merge_removes_partial_folders_of_dead_processes_only(ties_recipe, tmp_path):
    """What a SIGKILLed merge left is reclaimed by the next merge to that target; a live merge's
    folder (pid and start time of a running process) and names it did not write stay."""
    import subprocess
    import sys

    from umm.partials import process_start_cs  # the start time partial folder names carry

    out = tmp_path / "merged"
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    dead_start = process_start_cs(child.pid)
    child.communicate(b"")  # now gone; its pid may be reused, its start time is not
    me = os.getpid()
    my_start = process_start_cs(me)
    planted = {
        "dead": tmp_path / f".merged.partial-{child.pid}-{dead_start}-0badf00d",
        "reused pid": tmp_path / f".merged.partial-{me}-{my_start - 1000}-0badf00d",
        "live": tmp_path / f".merged.partial-{me}-{my_start}-0badf00d",
        "old layout": tmp_path / ".merged.partial-0badf00d",
        "other target": tmp_path / f".other.partial-{child.pid}-{dead_start}-0badf00d",
    }
    for path in planted.values():
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 1024)
    res = runner.invoke(app, ["merge", str(ties_recipe), str(out)])
    assert res.exit_code == 0, res.output
    assert not planted["dead"].exists() and not planted["reused pid"].exists()
    assert planted["live"].is_dir() and planted["old layout"].is_dir() and planted["other target"].is_dir()
    assert (out / "model.safetensors").is_file() and set(_partials(out)) == {planted["live"], planted["old layout"]}
