"""Open a Hugging Face model folder lazily: ``config.json`` and safetensors headers, no tensor data.

Only safetensors weights are read (``model.safetensors`` or the shards named by
``model.safetensors.index.json``); a folder with only pickle weights is refused and nothing is
ever unpickled. Every header is parsed and validated here at :meth:`Checkpoint.open` time, so a
truncated or inconsistent file is reported before any work starts.

Reading a tensor (:meth:`Checkpoint.get_tensor`) copies its bytes with positional reads
(``os.preadv``) from a file descriptor kept open per file into a freshly allocated tensor. We do
not memory-map: mapped pages of a 20 GB shard would be charged to this process's resident memory
and evicted at the kernel's discretion, whereas the merge executor needs to know exactly what it
holds. A copied tensor is writable, owned, and freed as soon as it is dropped; the page cache
still speeds up repeated reads. ``out=`` lets a caller reuse a buffer across tensors.

The safetensors format: 8 bytes little-endian u64 ``N``, then ``N`` bytes of UTF-8 JSON mapping
each tensor name to ``{"dtype", "shape", "data_offsets": [start, end]}`` (offsets relative to the
byte buffer that follows the header) plus an optional ``"__metadata__"`` string map; the tensors'
bytes fill the rest of the file contiguously, little-endian, row-major.
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import struct
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import torch

from umm.checkpoints.errors import CheckpointError, CorruptCheckpointError, NotSafetensorsError
from umm.checkpoints.safejson import loads_bounded, read_json_bounded

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
MAX_JSON_BYTES = 64 * 1024 * 1024  # config.json / index: generous, but bounded

# safetensors dtype code -> torch dtype (only those this torch build has).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _code, _attr in (
    ("U64", "uint64"),
    ("U32", "uint32"),
    ("U16", "uint16"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)
DTYPE_CODES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} has no safetensors equivalent") from None


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``byte_range`` is absolute ``[start, end)`` inside ``file``."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str
    byte_range: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.byte_range[1] - self.byte_range[0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: tensors in data order, metadata, and the file size."""

    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str]
    file_size: int


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_safetensors_header(f: BinaryIO, rel_name: str, file_size: int) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file open as ``f`` (``rel_name`` for messages).

    Checks: the JSON is valid, every dtype is known, every tensor's byte count matches its shape,
    the tensors tile the data area with no gap or overlap, and the file is exactly as long as the
    header says (shorter = truncated, longer = trailing garbage). Raises :class:`CorruptCheckpointError`.
    """

    def bad(msg: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{rel_name}: {msg}; the file is corrupt or incomplete: download it again")

    f.seek(0)
    head = f.read(8)
    if len(head) < 8:
        raise bad(f"file is {file_size} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > MAX_HEADER_BYTES:
        raise bad(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_len > file_size:
        raise bad(f"truncated: header says {header_len} header bytes but the file has {file_size - 8}")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise bad("truncated while reading the header")
    try:
        header = loads_bounded(raw, "header")
    except CorruptCheckpointError as e:
        raise bad(str(e)) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise bad("__metadata__ must map strings to strings")

    data_start = 8 + header_len
    entries: list[tuple[int, int, str, torch.dtype, tuple[int, ...]]] = []
    for name, spec in header.items():
        if not isinstance(spec, dict):
            raise bad(f"entry for tensor {name!r} is not an object")
        code = spec.get("dtype")
        if not isinstance(code, str) or code not in DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {code!r} (known: {', '.join(DTYPES)})")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {name!r} has an invalid shape {shape!r}")
        offsets = spec.get("data_offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise bad(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        dtype = DTYPES[code]
        expected = math.prod(shape) * _itemsize(dtype)
        if offsets[1] - offsets[0] != expected:
            raise bad(
                f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {tuple(shape)} "
                f"of {code} needs {expected}"
            )
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))

    entries.sort(key=lambda e: (e[0], e[1]))
    cursor = 0
    for start, end, name, _, _ in entries:
        if start != cursor:
            what = "overlaps the previous tensor" if start < cursor else f"leaves a gap at byte {cursor}"
            raise bad(f"tensor {name!r} starts at data byte {start} and {what}")
        cursor = end
    expected_size = data_start + cursor
    if file_size < expected_size:
        raise bad(f"truncated: {file_size} bytes on disk, header describes {expected_size}")
    if file_size > expected_size:
        raise bad(f"{file_size - expected_size} unexpected trailing bytes after the last tensor")

    tensors = tuple(
        TensorInfo(name, dtype, shape, rel_name, (data_start + start, data_start + end))
        for start, end, name, dtype, shape in entries
    )
    return SafetensorsHeader(tensors, MappingProxyType(dict(metadata)), file_size)


def read_json_file(path: Path, what: str) -> Any:
    """Parse a small JSON file (size and nesting bounded), every failure a :class:`CorruptCheckpointError`."""
    return read_json_bounded(path, what, MAX_JSON_BYTES)


def _safe_relative(name: Any, where: str) -> str:
    """Validate a file name taken from an index: relative, inside the folder, posix."""
    if not isinstance(name, str) or not name:
        raise CorruptCheckpointError(f"{where}: shard name {name!r} is not a non-empty string")
    norm = posixpath.normpath(name)
    if (
        "\\" in name
        or "\x00" in name
        or name.startswith("/")
        or norm.startswith("..")
        or norm != name
        or ":" in name.split("/")[0]
    ):
        raise CorruptCheckpointError(f"{where}: shard name {name!r} is not a plain relative path inside the folder")
    return name


def weight_files_of(folder: Path) -> tuple[list[str], Mapping[str, str] | None]:
    """The safetensors files of ``folder`` and, for a sharded folder, its ``weight_map``.

    ``model.safetensors`` wins over an index when both exist, as in transformers, so that we
    read exactly what :func:`~umm.checkpoints.loading.load_causal_lm` would load.

    Raises :class:`NotSafetensorsError` for a pickle-only folder and
    :class:`CorruptCheckpointError` when no usable weights are found.
    """
    if (folder / SAFE_WEIGHTS_NAME).is_file():  # transformers prefers it over an index too
        return [SAFE_WEIGHTS_NAME], None
    index_path = folder / SAFE_INDEX_NAME
    if index_path.exists():
        index = read_json_file(index_path, "the shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CorruptCheckpointError(f"{index_path}: has no non-empty 'weight_map' object")
        files: list[str] = []
        for _tensor_name, file_name in weight_map.items():
            _safe_relative(file_name, str(index_path))
            if file_name not in files:
                files.append(file_name)
        for file_name in files:
            if not (folder / file_name).is_file():
                raise CorruptCheckpointError(
                    f"{folder}: the index names shard {file_name!r}, which is missing; "
                    "the download is incomplete: fetch the model again"
                )
        return files, weight_map

    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    others = [n for n in names if n.endswith(".safetensors")]
    if others:
        raise CorruptCheckpointError(
            f"{folder}: has {', '.join(others)} but neither {SAFE_WEIGHTS_NAME} nor {SAFE_INDEX_NAME}; "
            "save the model with save_pretrained"
        )
    if pickles:
        raise NotSafetensorsError(
            f"{folder} contains only pickle weights ({', '.join(pickles)}); umm loads safetensors only: "
            "convert it with a trusted tool first (e.g. load it yourself in a sandbox and save_pretrained "
            "with safe_serialization=True)"
        )
    raise CorruptCheckpointError(f"{folder}: no weights found (expected {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME})")


def config_num_layers(config: Mapping[str, Any]) -> int | None:
    """The number of transformer blocks a config declares, if it declares one."""
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    text = config.get("text_config")
    if isinstance(text, dict):
        return config_num_layers(text)
    return None


class Checkpoint:
    """A Hugging Face model folder opened lazily: config + safetensors headers, no tensor data.

    Open with :meth:`open`; close (or use as a context manager) to release the file descriptors.
    Reads are thread-safe (positional reads on shared descriptors).
    """

    path: Path
    config: dict

    def __init__(
        self,
        path: Path,
        config: dict,
        tensors: Mapping[str, TensorInfo],
        weight_files: list[str],
        handles: dict[str, BinaryIO],
        metadata: Mapping[str, Mapping[str, str]],
    ) -> None:
        self.path = path
        self.config = config
        self._tensors = MappingProxyType(dict(tensors))
        self._weight_files = list(weight_files)
        self._handles = handles
        self._metadata = MappingProxyType(dict(metadata))
        self._lock = threading.Lock()  # only for platforms without os.preadv

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Open and validate the folder at ``path`` (config, index, every shard's header)."""
        folder = Path(path).expanduser()
        if not folder.exists():
            raise CheckpointError(f"{folder}: no such model folder")
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: is not a folder (give the model folder, not a file)")
        config_path = folder / CONFIG_NAME
        if not config_path.exists():
            # Report pickle-only folders as such even when config.json is also missing.
            weight_files_of(folder)
        config = read_json_file(config_path, "config.json")
        if not isinstance(config, dict):
            raise CorruptCheckpointError(f"{config_path}: is not a JSON object")
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise CorruptCheckpointError(f"{config_path}: has no 'model_type' string")

        files, weight_map = weight_files_of(folder)
        handles: dict[str, BinaryIO] = {}
        try:
            headers: dict[str, SafetensorsHeader] = {}
            for rel in files:
                try:
                    fh = open(folder / rel, "rb", buffering=0)
                except OSError as e:  # unreadable, or more shards than file descriptors
                    raise CorruptCheckpointError(f"{folder / rel}: cannot open ({e.strerror or e})") from None
                handles[rel] = fh
                headers[rel] = parse_safetensors_header(fh, rel, os.fstat(fh.fileno()).st_size)
            tensors = cls._collect(folder, headers, weight_map)
        except BaseException:
            for fh in handles.values():
                fh.close()
            raise
        ckpt = cls(folder, config, tensors, files, handles, {k: h.metadata for k, h in headers.items()})
        logger.debug("opened %s: %d tensors in %d files", folder, len(tensors), len(files))
        return ckpt

    @staticmethod
    def _collect(
        folder: Path, headers: Mapping[str, SafetensorsHeader], weight_map: Mapping[str, str] | None
    ) -> dict[str, TensorInfo]:
        if weight_map is None:
            (header,) = headers.values()
            return {t.name: t for t in header.tensors}
        by_file = {rel: {t.name: t for t in h.tensors} for rel, h in headers.items()}
        tensors: dict[str, TensorInfo] = {}
        for name, rel in weight_map.items():
            info = by_file[rel].get(name)
            if info is None:
                raise CorruptCheckpointError(
                    f"{folder}: the index puts tensor {name!r} in {rel}, which does not contain it"
                )
            tensors[name] = info
        for rel, infos in by_file.items():
            for name in infos:
                if weight_map.get(name) != rel:
                    raise CorruptCheckpointError(
                        f"{folder}: {rel} holds tensor {name!r}, which the index "
                        + ("does not list" if name not in weight_map else f"places in {weight_map[name]}")
                    )
        return tensors

    # -- description --------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return str(self.config["model_type"])

    @property
    def num_layers(self) -> int | None:
        return config_num_layers(self.config)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor, in index order (sharded) or data order (single file)."""
        return self._tensors

    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    @property
    def weight_files(self) -> list[str]:
        return list(self._weight_files)

    @property
    def metadata(self) -> Mapping[str, Mapping[str, str]]:
        """The ``__metadata__`` of each weight file."""
        return self._metadata

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self._tensors.values())

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors.values())

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype holding most of the weight bytes (``None`` for an empty checkpoint)."""
        by_dtype: dict[torch.dtype, int] = {}
        for t in self._tensors.values():
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
        return max(by_dtype, key=lambda d: by_dtype[d]) if by_dtype else None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, model_type={self.model_type!r}, tensors={len(self._tensors)})"

    # -- reading ------------------------------------------------------------------------------

    def get_tensor(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read tensor ``name`` into a new CPU tensor (or into ``out``) and return it.

        ``out`` may be a contiguous CPU tensor of the same dtype and shape (filled and returned),
        or a contiguous ``uint8`` buffer of at least :attr:`TensorInfo.nbytes` bytes (its prefix
        is filled and returned viewed with the tensor's dtype and shape).
        """
        info = self._tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        if out is None:
            result = torch.empty(info.shape, dtype=info.dtype)
        else:
            result = self._output_view(info, out)
        if info.nbytes:
            self._read_into(info, result.reshape(-1).view(torch.uint8))
        return result

    def get_rows(self, name: str, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, end)`` (along dim 0) of tensor ``name``, read without the rest of it.

        Lets a caller process a large tensor (an embedding, a fused MLP) in bounded slices.
        ``out`` works as in :meth:`get_tensor`, for the slice's shape.
        """
        info = self._tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        if not info.shape:
            raise ValueError(f"tensor {name!r} is a scalar; it has no rows")
        rows = info.shape[0]
        if not 0 <= start <= end <= rows:
            raise ValueError(f"rows [{start}, {end}) are out of range for {name!r} with {rows} rows")
        row_bytes = info.nbytes // rows if rows else 0
        first = info.byte_range[0] + start * row_bytes
        last = first + (end - start) * row_bytes
        part = TensorInfo(name, info.dtype, (end - start, *info.shape[1:]), info.file, (first, last))
        result = torch.empty(part.shape, dtype=part.dtype) if out is None else self._output_view(part, out)
        if part.nbytes:
            self._read_into(part, result.reshape(-1).view(torch.uint8))
        return result

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` one at a time, in :attr:`tensors` order (or ``names`` order)."""
        for name in self.tensor_names if names is None else names:
            yield name, self.get_tensor(name)

    @staticmethod
    def _output_view(info: TensorInfo, out: torch.Tensor) -> torch.Tensor:
        if out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError("out must be a contiguous CPU tensor")
        if out.dtype == info.dtype and tuple(out.shape) == info.shape:
            return out
        if out.dtype == torch.uint8 and out.numel() >= info.nbytes:
            flat = out.reshape(-1)[: info.nbytes]
            if not info.nbytes:
                return torch.empty(info.shape, dtype=info.dtype)
            return flat.view(info.dtype).view(info.shape)
        raise ValueError(
            f"out ({out.dtype}, {tuple(out.shape)}) fits neither {info.name!r} ({info.dtype}, {info.shape}) "
            f"nor as a uint8 buffer of >= {info.nbytes} bytes"
        )

    def _read_into(self, info: TensorInfo, dest: torch.Tensor) -> None:
        fh = self._handles.get(info.file)
        if fh is None or fh.closed:
            raise CheckpointError(f"{self.path}: checkpoint is closed")
        view = memoryview(dest.numpy()).cast("B")
        start, end = info.byte_range
        done = 0
        while done < end - start:
            if hasattr(os, "preadv"):
                n = os.preadv(fh.fileno(), [view[done:]], start + done)
            else:  # pragma: no cover - Windows
                with self._lock:
                    fh.seek(start + done)
                    n = fh.readinto(view[done:]) or 0
            if n == 0:
                raise CorruptCheckpointError(
                    f"{self.path / info.file}: ended while reading tensor {info.name!r}; "
                    "the file changed after it was opened"
                )
            done += n
        if sys.byteorder == "big" and dest.numel() and info.nbytes // max(info.numel, 1) > 1:  # pragma: no cover
            size = info.nbytes // info.numel
            dest.copy_(dest.view(-1, size).flip(1).reshape(-1))

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the weight files; the metadata stays readable."""
        for fh in self._handles.values():
            fh.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        handles = getattr(self, "_handles", None)
        if handles:
            for fh in handles.values():
                try:
                    fh.close()
                except OSError:
                    pass
