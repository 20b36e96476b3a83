"""Checkpoint reader: equal to safetensors' own loader, and strict about broken folders."""

from __future__ import annotations

import json
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from umm.checkpoints import (
    Checkpoint,
    CheckpointError,
    CorruptCheckpointError,
    NotSafetensorsError,
)
from umm.checkpoints.errors import UmmError
from umm.experts.random_models import make_random_llama


@pytest.fixture(scope="module")
def sharded_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bf16 Llama split into several shards (read-only)."""
    return make_random_llama(
        tmp_path_factory.mktemp("sharded") / "m", seed=3, dtype=torch.bfloat16, max_shard_size="40KB"
    )


def _reference(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_single_file_equals_safetensors(tiny_models: dict[str, Path]) -> None:
    with Checkpoint.open(tiny_models["base"]) as ckpt:
        ref = load_file(tiny_models["base"] / "model.safetensors")
        assert ckpt.weight_files == ["model.safetensors"]
        assert set(ckpt.tensor_names) == set(ref)
        for name in ckpt.tensor_names:
            t = ckpt.get_tensor(name)
            assert t.dtype == ref[name].dtype and t.shape == ref[name].shape
            assert torch.equal(t, ref[name]), name
        assert ckpt.model_type == "llama" and ckpt.dtype == torch.float32
        assert ckpt.num_layers == 2
        assert ckpt.num_parameters == sum(v.numel() for v in ref.values())
        assert ckpt.weight_bytes == sum(v.numel() * v.element_size() for v in ref.values())


def test_sharded_bf16_equals_safetensors_in_index_order(sharded_bf16: Path) -> None:
    index = json.loads((sharded_bf16 / "model.safetensors.index.json").read_text())
    ref = _reference(sharded_bf16)
    with Checkpoint.open(sharded_bf16) as ckpt:
        assert len(ckpt.weight_files) > 1 and ckpt.dtype == torch.bfloat16
        assert ckpt.tensor_names == list(index["weight_map"])
        for name, info in ckpt.tensors.items():
            assert info.file == index["weight_map"][name]
            assert info.dtype == torch.bfloat16
            t = ckpt.get_tensor(name)
            assert t.dtype == torch.bfloat16 and torch.equal(t, ref[name]), name


def test_byte_range_locates_the_raw_bytes(sharded_bf16: Path) -> None:
    with Checkpoint.open(sharded_bf16) as ckpt:
        for info in list(ckpt.tensors.values())[:4]:
            start, end = info.byte_range
            raw = (sharded_bf16 / info.file).read_bytes()[start:end]
            assert len(raw) == info.nbytes == info.numel * 2
            assert raw == ckpt.get_tensor(info.name).view(torch.uint8).numpy().tobytes()


def test_tensor_is_fresh_writable_copy(tiny_models: dict[str, Path]) -> None:
    with Checkpoint.open(tiny_models["base"]) as ckpt:
        name = ckpt.tensor_names[0]
        a = ckpt.get_tensor(name)
        original = a.clone()
        a.fill_(7.0)  # must not raise (not a read-only mapping) and must not leak into the next read
        b = ckpt.get_tensor(name)
        assert torch.equal(b, original)
        assert a.data_ptr() != b.data_ptr()


def test_out_buffers_are_reused(sharded_bf16: Path) -> None:
    ref = _reference(sharded_bf16)
    with Checkpoint.open(sharded_bf16) as ckpt:
        biggest = max(i.nbytes for i in ckpt.tensors.values())
        buf = torch.empty(biggest, dtype=torch.uint8)
        for name in ckpt.tensor_names:
            t = ckpt.get_tensor(name, out=buf)
            assert t.data_ptr() == buf.data_ptr()
            assert torch.equal(t, ref[name])
        name = ckpt.tensor_names[0]
        typed = torch.empty(ckpt.tensors[name].shape, dtype=torch.bfloat16)
        assert ckpt.get_tensor(name, out=typed) is typed and torch.equal(typed, ref[name])
        with pytest.raises(ValueError):
            ckpt.get_tensor(name, out=torch.empty(3, dtype=torch.uint8))


def test_concurrent_reads_agree(sharded_bf16: Path) -> None:
    ref = _reference(sharded_bf16)
    errors: list[str] = []
    with Checkpoint.open(sharded_bf16) as ckpt:

        def worker() -> None:
            for name in ckpt.tensor_names:
                if not torch.equal(ckpt.get_tensor(name), ref[name]):
                    errors.append(name)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_all_dtypes_scalars_and_empty_tensors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 2, generator=gen, dtype=torch.float64),
        "f32": torch.randn(5, generator=gen),
        "f16": torch.randn(4, 4, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).bfloat16(),
        "i64": torch.arange(-3, 3, dtype=torch.int64),
        "i32": torch.arange(7, dtype=torch.int32),
        "i16": torch.arange(-2, 2, dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }
    if hasattr(torch, "float8_e4m3fn"):
        tensors["f8"] = torch.randn(6, generator=gen).to(torch.float8_e4m3fn)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom"}))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.metadata["model.safetensors"] == {"format": "pt"}
        for name, want in tensors.items():
            got = ckpt.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
        assert ckpt.num_layers is None


# -- broken folders --------------------------------------------------------------------------


def test_truncated_shard_fails_at_open_naming_the_file(sharded_bf16: Path, tmp_path: Path) -> None:
    folder = _copy(sharded_bf16, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name}.*truncated"):
        Checkpoint.open(folder)


def test_trailing_bytes_and_bad_headers_are_corrupt(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "m")
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original + b"\0" * 4)
    with pytest.raises(CorruptCheckpointError, match="trailing"):
        Checkpoint.open(folder)
    (header_len,) = struct.unpack("<Q", original[:8])
    weights.write_bytes(original[:8] + b"{not json" + original[17 : 8 + header_len] + original[8 + header_len :])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*not valid JSON"):
        Checkpoint.open(folder)
    weights.write_bytes(struct.pack("<Q", 1 << 40) + original[8:])
    with pytest.raises(CorruptCheckpointError, match="header length"):
        Checkpoint.open(folder)
    weights.write_bytes(original[:5])
    with pytest.raises(CorruptCheckpointError, match="too short"):
        Checkpoint.open(folder)


def test_header_lies_about_shape_or_overlaps(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def write(header: dict, data: bytes) -> None:
        raw = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)

    write({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="'a' spans 8 bytes"):
        Checkpoint.open(folder)
    write(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        b"\0" * 12,
    )
    with pytest.raises(CorruptCheckpointError, match="overlaps"):
        Checkpoint.open(folder)
    write({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="unsupported dtype"):
        Checkpoint.open(folder)
    write({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CorruptCheckpointError, match="invalid shape"):
        Checkpoint.open(folder)


def test_missing_shard_is_named(sharded_bf16: Path, tmp_path: Path) -> None:
    folder = _copy(sharded_bf16, tmp_path / "m")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CorruptCheckpointError, match=f"{shard.name}.*missing"):
        Checkpoint.open(folder)


def test_index_naming_a_tensor_the_shard_lacks(sharded_bf16: Path, tmp_path: Path) -> None:
    folder = _copy(sharded_bf16, tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_file = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.ghost.weight"] = first_file
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="'model.ghost.weight'"):
        Checkpoint.open(folder)
    # A shard holding a tensor the index does not list is inconsistent too.
    del index["weight_map"]["model.ghost.weight"]
    files = list(index["weight_map"].values())
    dropped = next(n for n, f in index["weight_map"].items() if files.count(f) > 1)
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match=f"{dropped}.*does not list"):
        Checkpoint.open(folder)


def test_index_cannot_point_outside_the_folder(sharded_bf16: Path, tmp_path: Path) -> None:
    folder = _copy(sharded_bf16, tmp_path / "m")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CorruptCheckpointError, match="not a plain relative path"):
        Checkpoint.open(folder)


def test_missing_or_invalid_config(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="config.json is missing"):
        Checkpoint.open(folder)
    (folder / "config.json").write_text("{oops")
    with pytest.raises(CorruptCheckpointError, match="config.json.*not valid JSON"):
        Checkpoint.open(folder)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
    with pytest.raises(CorruptCheckpointError, match="model_type"):
        Checkpoint.open(folder)


def test_pickle_only_folder_is_refused_without_unpickling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(NotSafetensorsError, match=r"only pickle weights \(pytorch_model.bin\).*convert"):
        Checkpoint.open(folder)
    (folder / "config.json").unlink()  # still reported as pickle-only, the real problem
    with pytest.raises(NotSafetensorsError):
        Checkpoint.open(folder)


def test_no_weights_and_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CorruptCheckpointError, match="no weights"):
        Checkpoint.open(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        Checkpoint.open(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no such model folder"):
        Checkpoint.open(tmp_path / "nope")
    assert issubclass(CheckpointError, UmmError)


def test_unknown_tensor_and_closed_checkpoint(tiny_models: dict[str, Path]) -> None:
    ckpt = Checkpoint.open(tiny_models["base"])
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        ckpt.get_tensor("nope")
    name = ckpt.tensor_names[0]
    ckpt.close()
    assert name in ckpt and ckpt.tensors[name].numel > 0  # metadata survives close
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.get_tensor(name)


def test_single_file_wins_over_a_stale_index_like_transformers(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(tiny_models["base"], tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}})
    )
    with Checkpoint.open(folder) as ckpt:
        assert ckpt.weight_files == ["model.safetensors"]
        names = [name for name, _ in ckpt.iter_tensors()]
        assert names == ckpt.tensor_names and "x" not in ckpt


def test_get_rows_reads_a_slice(sharded_bf16: Path) -> None:
    ref = _reference(sharded_bf16)
    with Checkpoint.open(sharded_bf16) as ckpt:
        name = "model.embed_tokens.weight"
        assert torch.equal(ckpt.get_rows(name, 10, 37), ref[name][10:37])
        assert ckpt.get_rows(name, 5, 5).shape == (0, ref[name].shape[1])
        buf = torch.empty(1 << 16, dtype=torch.uint8)
        assert torch.equal(ckpt.get_rows(name, 0, 3, out=buf), ref[name][:3])
        with pytest.raises(ValueError, match="out of range"):
            ckpt.get_rows(name, 0, ref[name].shape[0] + 1)
