"""The streaming checkpoint writer: shard planning, out-of-order writes, atomic publish, failures."""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from umm.checkpoints.writer import (
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointWriteError,
    CheckpointWriter,
    OutputExistsError,
    TensorSpec,
    model_card,
    parse_size,
    plan_shards,
)
from umm.errors import UmmError


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(40, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g).half(),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(5, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


def _specs(ts: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in ts.items()]


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_plan_shards_greedy_hf_names_and_oversized_tensor():
    specs = [TensorSpec(f"t{i}", torch.float32, (25,)) for i in range(5)]  # 100 bytes each
    plan = plan_shards(specs, 250)
    assert plan.files == tuple(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
    assert [plan.slots[f"t{i}"].shard for i in range(5)] == [0, 0, 1, 1, 2]
    # one tensor bigger than the limit gets a shard of its own; one shard -> model.safetensors
    assert plan_shards([TensorSpec("big", torch.float32, (1000,))], 10).files == (SINGLE_FILE,)
    assert plan_shards(specs, 10**9).files == (SINGLE_FILE,)
    # offsets tile each shard's data area after its (8-byte aligned) header
    s0, s1 = plan.slots["t0"], plan.slots["t1"]
    assert (s0.offset - 8) % 8 == 0 and s1.offset == s0.offset + 100
    assert plan.file_sizes[0] == s1.offset + 100


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200MB") == 200 * 10**6
    assert parse_size("1.5KiB") == 1536
    assert parse_size(1234) == 1234
    with pytest.raises(UmmError, match="shard size"):
        parse_size("lots")
    with pytest.raises(UmmError):
        parse_size("0MB")


def test_out_of_order_threaded_row_writes_load_back_exactly(tmp_path: Path):
    ts = _tensors()
    out = tmp_path / "model"
    with CheckpointWriter(out, _specs(ts), max_shard_bytes=600) as w:
        emb = ts["model.embed_tokens.weight"]
        # rows of one tensor from several threads, in reverse order
        threads = [threading.Thread(target=w.write_rows, args=("model.embed_tokens.weight", s, emb[s : s + 10]))
                   for s in (30, 20, 10, 0)]
        for th in threads:
            th.start()
        for name in reversed(list(ts)):
            if name != "model.embed_tokens.weight":
                w.write_tensor(name, ts[name])
        for th in threads:
            th.join()
        w.copy_files(tmp_path, ["does-not-exist.json"])
        w.write_json("config.json", {"model_type": "llama"})
        w.finalize()
    files = sorted(p.name for p in out.iterdir())
    assert INDEX_FILE in files and "config.json" in files
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(ts)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ts.values())
    for name, file in index["weight_map"].items():
        with safe_open(str(out / file), "pt") as h:
            assert name in h.keys()
            assert h.metadata() == {"format": "pt"}
    got = _load_folder(out)
    for name, t in ts.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert _leftovers(tmp_path) == []


def test_single_shard_has_no_index(tmp_path: Path):
    ts = _tensors()
    with CheckpointWriter(tmp_path / "m", _specs(ts)) as w:
        for n, t in ts.items():
            w.write_tensor(n, t)
        w.finalize()
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [SINGLE_FILE]


def test_wrong_shape_or_dtype_rejected(tmp_path: Path):
    ts = _tensors()
    with CheckpointWriter(tmp_path / "m", _specs(ts)) as w:
        with pytest.raises(ValueError, match="shape"):
            w.write_tensor("model.layers.0.mlp.up_proj.weight", torch.zeros(8, 16))
        with pytest.raises(ValueError, match="dtype"):
            w.write_tensor("model.layers.0.mlp.up_proj.weight", torch.zeros(16, 8).double())
        with pytest.raises(ValueError, match="not part"):
            w.write_tensor("nope", torch.zeros(1))
    assert not (tmp_path / "m").exists() and _leftovers(tmp_path) == []


def test_incomplete_output_is_never_published(tmp_path: Path):
    ts = _tensors()
    with pytest.raises(RuntimeError, match="not .fully. written"):
        with CheckpointWriter(tmp_path / "m", _specs(ts)) as w:
            w.write_tensor("scalar", ts["scalar"])
            w.finalize()
    assert not (tmp_path / "m").exists() and _leftovers(tmp_path) == []


def test_exception_and_interrupt_remove_temp_dir(tmp_path: Path):
    ts = _tensors()
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with CheckpointWriter(tmp_path / "m", _specs(ts)) as w:
                w.write_tensor("scalar", ts["scalar"])
                assert w.tmp_dir is not None and w.tmp_dir.exists()
                raise exc
        assert not (tmp_path / "m").exists() and _leftovers(tmp_path) == []


def test_interrupt_while_opening_removes_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C (or SIGTERM) after the temporary folder exists but before ``with`` is entered: no
    ``__exit__`` runs, so opening must clean up itself."""
    import umm.checkpoints.writer as writer_mod

    def interrupted(fd, size):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer_mod, "_reserve", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(tmp_path / "m", _specs(_tensors())):
            pass
    assert not (tmp_path / "m").exists() and _leftovers(tmp_path) == []


def test_disk_full_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ts = _tensors()
    real = os.pwrite
    calls = {"n": 0}

    def failing_pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:  # headers are written; fail on the tensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing_pwrite)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        with CheckpointWriter(tmp_path / "m", _specs(ts), max_shard_bytes=600) as w:
            for n, t in ts.items():
                w.write_tensor(n, t)
            w.finalize()
    assert not (tmp_path / "m").exists() and _leftovers(tmp_path) == []


def test_existing_output_refused_unless_overwrite(tmp_path: Path):
    ts = _tensors()
    out = tmp_path / "m"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        CheckpointWriter(out, _specs(ts))
    # a failed overwrite keeps the old folder
    with pytest.raises(RuntimeError):
        with CheckpointWriter(out, _specs(ts), overwrite=True) as w:
            w.write_tensor("scalar", ts["scalar"])
            raise RuntimeError("merge failed")
    assert (out / "old.txt").read_text() == "old"
    # a successful one replaces it
    with CheckpointWriter(out, _specs(ts), overwrite=True) as w:
        for n, t in ts.items():
            w.write_tensor(n, t)
        w.finalize()
    assert not (out / "old.txt").exists() and (out / SINGLE_FILE).exists()
    assert _leftovers(tmp_path) == []
    # an empty existing folder is simply used
    empty = tmp_path / "empty"
    empty.mkdir()
    with CheckpointWriter(empty, _specs(ts)) as w:
        for n, t in ts.items():
            w.write_tensor(n, t)
        w.finalize()
    assert (empty / SINGLE_FILE).exists()


def test_model_card_names_sources_method_and_recipe():
    card = model_card(method="ties", sources=["/m/base", "/m/a"], base_model="/m/base",
                      recipe={"merge_method": "ties", "parameters": {"normalize": True}},
                      recipe_yaml="merge_method: ties\n",
                      out_dtype="bfloat16", version="9.9")
    assert "`/m/base` (base)" in card and "`/m/a`" in card
    assert "ties" in card and "`normalize`: `true`" in card and "merge_method: ties" in card and "9.9" in card


def test_background_syncs_run_while_writing_and_their_errors_fail_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    import umm.checkpoints.writer as writer_mod

    ts = _tensors()
    synced: list[int] = []
    real = writer_mod._datasync
    monkeypatch.setattr(writer_mod, "_datasync", lambda fd: (synced.append(fd), real(fd)))
    with CheckpointWriter(tmp_path / "m", _specs(ts), max_shard_bytes=600, sync_every=64) as w:
        for n, t in ts.items():
            w.write_tensor(n, t)
        w.finalize()
    assert synced  # the 640-byte embedding alone crosses the 64-byte mark
    assert all(torch.equal(_load_folder(tmp_path / "m")[n], t) for n, t in ts.items())

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(writer_mod, "_datasync", failing)
    with pytest.raises(CheckpointWriteError, match="I/O error"):
        with CheckpointWriter(tmp_path / "bad", _specs(ts), sync_every=64) as w:
            for n, t in ts.items():
                w.write_tensor(n, t)
            w.finalize()
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []
