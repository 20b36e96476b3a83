"""Write a Hugging Face model folder atomically, streaming tensor bytes into pre-planned shards.

The output layout (every tensor's name, dtype and shape) is known before any tensor is
produced, so :func:`plan_shards` places every tensor up front: shards are filled greedily in the
given order up to ``max_shard_bytes`` and named as ``save_pretrained`` names them
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``, or a single
``model.safetensors``). :class:`CheckpointWriter` then writes each shard's safetensors header
first, reserves the file's full size, and ``os.pwrite``\\ s each tensor's bytes (or a block of its
rows) at its planned offset as soon as it is produced, in any order and from any thread. No
output shard is ever held in memory.

Atomicity: everything is written into a sibling temporary folder
``.<name>.partial-<pid>-<start>-<random>`` (named after the writing process, :mod:`umm.partials`);
:meth:`CheckpointWriter.finalize` checks that every byte was written, fsyncs the files and the
folder and renames it onto the target. To keep that final sync short, a background thread
``fdatasync``\\ s a shard each time ``sync_every`` more bytes have been written into it, so most
of the data reaches the disk while later tensors are still being computed. With ``overwrite=True`` an existing target is replaced only
after the new folder is complete. Any exception (or ``KeyboardInterrupt``) inside the ``with``
block removes the temporary folder, so a failed or interrupted write leaves nothing behind. A
process killed before it could do so (SIGKILL) leaves its folder; :meth:`CheckpointWriter.open`
removes such folders of dead processes beside the target before it starts (never a live one's).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from umm.atomic import fsync_dir, fsync_file
from umm.errors import UmmError
from umm.partials import partial_path, remove_stale_partials

logger = logging.getLogger(__name__)

#: torch dtype -> safetensors dtype tag.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _tag in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        SAFETENSORS_DTYPES[getattr(torch, _name)] = _tag

#: Tokenizer files copied from the tokenizer source, when present.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

#: Bytes written into a shard after which a background ``fdatasync`` of it starts.
DEFAULT_SYNC_EVERY = 64 * 2**20

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class OutputExistsError(UmmError):
    """The output folder exists and ``overwrite`` was not asked for."""


class CheckpointWriteError(UmmError):
    """Writing the output failed (disk full, permission, ...); nothing was left at the target."""


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class TensorSlot:
    """Where a tensor's bytes go: shard index and absolute byte offset inside that file."""

    spec: TensorSpec
    shard: int
    offset: int


@dataclass(frozen=True)
class ShardPlan:
    """The full output layout: shard file names, their header bytes and every tensor's slot."""

    files: tuple[str, ...]
    headers: tuple[bytes, ...]
    file_sizes: tuple[int, ...]
    slots: Mapping[str, TensorSlot]

    @property
    def total_tensor_bytes(self) -> int:
        return sum(s.spec.nbytes for s in self.slots.values())


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parse_size(size: str | int | float) -> int:
    """``"5GB"`` / ``"200MB"`` / ``"512KiB"`` / ``1000000`` -> bytes (decimal units as HF uses)."""
    if isinstance(size, (int, float)):
        if size <= 0:
            raise UmmError(f"shard size must be positive, got {size}")
        return int(size)
    text = size.strip().upper().replace(" ", "")
    units = {
        "TIB": 1 << 40, "GIB": 1 << 30, "MIB": 1 << 20, "KIB": 1 << 10,
        "TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1,
    }
    unit = next((u for u in units if text.endswith(u)), None)
    number, factor = (text[: -len(unit)], units[unit]) if unit else (text, 1)
    try:
        value = float(number)
    except ValueError:
        raise UmmError(f"cannot read shard size {size!r}: use e.g. 5GB, 200MB or a byte count") from None
    if value <= 0:
        raise UmmError(f"shard size must be positive, got {size!r}")
    return int(value * factor)


def _header_bytes(entries: Sequence[tuple[TensorSpec, int]], metadata: Mapping[str, str]) -> bytes:
    """Safetensors header (length prefix + JSON padded to 8 bytes); offsets relative to data start."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    for spec, rel in entries:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [rel, rel + spec.nbytes],
        }
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def plan_shards(
    specs: Sequence[TensorSpec],
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> ShardPlan:
    """Place tensors greedily, in order, into shards of at most ``max_shard_bytes`` of tensor data.

    A tensor larger than the limit gets a shard of its own (as ``save_pretrained`` does).
    """
    if max_shard_bytes <= 0:
        raise UmmError("max shard size must be positive")
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise ValueError(f"duplicate output tensor {s.name!r}")
        if s.dtype not in SAFETENSORS_DTYPES:
            raise UmmError(f"tensor {s.name!r}: dtype {s.dtype} cannot be stored in safetensors")
        seen.add(s.name)
    groups: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for s in specs:
        if current and size + s.nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(s)
        size += s.nbytes
    if current or not groups:
        groups.append(current)
    meta = {"format": "pt", **(metadata or {})}
    n = len(groups)
    files = (SINGLE_FILE,) if n == 1 else tuple(f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n))
    headers: list[bytes] = []
    sizes: list[int] = []
    slots: dict[str, TensorSlot] = {}
    for i, group in enumerate(groups):
        rel = 0
        entries = []
        for s in group:
            entries.append((s, rel))
            rel += s.nbytes
        header = _header_bytes(entries, meta)
        headers.append(header)
        sizes.append(len(header) + rel)
        for s, r in entries:
            slots[s.name] = TensorSlot(s, i, len(header) + r)
    return ShardPlan(files, tuple(headers), tuple(sizes), slots)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data = data[n:]
        offset += n


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size; allocate the blocks when the filesystem can, so a full disk
    fails now rather than in the middle of the merge."""
    if size == 0:
        return
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    os.ftruncate(fd, size)


class CheckpointWriter:
    """Streams tensors into a planned, sharded safetensors folder and publishes it atomically.

    Use as a context manager::

        with CheckpointWriter(out, specs, max_shard_bytes=5 * 10**9) as w:
            for name, tensor in produced:            # any order, any thread
                w.write_tensor(name, tensor)
            w.copy_files(base_dir, ["config.json"])
            w.finalize()                             # fsync + rename onto ``out``

    ``write_rows`` writes a block of leading-dimension rows of a tensor, so a tensor can be
    produced in chunks. Leaving the block without :meth:`finalize` (or by an exception) removes
    the temporary folder.
    """

    def __init__(
        self,
        out_dir: str | Path,
        specs: Sequence[TensorSpec],
        *,
        max_shard_bytes: int = 5 * 10**9,
        overwrite: bool = False,
        metadata: Mapping[str, str] | None = None,
        sync_every: int | None = DEFAULT_SYNC_EVERY,
    ) -> None:
        self.out_dir = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.plan = plan_shards(specs, max_shard_bytes, metadata)
        self.tmp_dir: Path | None = None
        self._fds: list[int] = []
        self._written: dict[str, int] = {}
        self._lock = threading.Lock()
        self._finalized = False
        self._flusher = BackgroundSync(sync_every) if sync_every else None
        check_output_dir(self.out_dir, overwrite)

    # -- lifecycle -------------------------------------------------------------------------
    def open(self) -> CheckpointWriter:
        """Create the temporary folder and the shard files (headers written, size reserved)."""
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            prefix = partial_prefix(self.out_dir)
            remove_stale_partials(parent, prefix)
            self.tmp_dir = partial_path(parent, prefix)
            self.tmp_dir.mkdir()
            for name, header, size in zip(self.plan.files, self.plan.headers, self.plan.file_sizes):
                fd = os.open(self.tmp_dir / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds.append(fd)
                _reserve(fd, size)
                _pwrite_all(fd, memoryview(header), 0)
        except OSError as exc:
            self.abort()
            raise CheckpointWriteError(f"cannot create the output next to {self.out_dir}: {exc}") from exc
        except BaseException:  # Ctrl-C/SIGTERM while reserving: the caller's __exit__ will not run
            self.abort()
            raise
        logger.info("writing %d shard(s) into %s", len(self.plan.files), self.tmp_dir)
        return self

    def __enter__(self) -> CheckpointWriter:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finalized:
            self.abort()

    def abort(self) -> None:
        """Close files and remove the temporary folder (idempotent)."""
        if self._flusher is not None:
            try:
                self._flusher.stop()  # before closing: it must never sync a closed (reused) fd
            except OSError:
                pass  # the output is being discarded anyway
        self._close_fds()
        if self.tmp_dir is not None and self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            logger.info("removed unfinished output %s", self.tmp_dir)

    def _close_fds(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    # -- tensors ---------------------------------------------------------------------------
    def slot(self, name: str) -> TensorSlot:
        try:
            return self.plan.slots[name]
        except KeyError:
            raise ValueError(f"tensor {name!r} is not part of the planned output") from None

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Write a whole tensor (must have the planned dtype and shape). Thread-safe."""
        spec = self.slot(name).spec
        if tuple(tensor.shape) != spec.shape:
            raise ValueError(f"tensor {name!r}: shape {tuple(tensor.shape)} != planned {spec.shape}")
        self.write_rows(name, 0, tensor)

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` (a block of the leading dimension starting at ``row_start``). Thread-safe."""
        slot = self.slot(name)
        spec = slot.spec
        if rows.dtype != spec.dtype:
            raise ValueError(f"tensor {name!r}: dtype {rows.dtype} != planned {spec.dtype}")
        if spec.shape and tuple(rows.shape[1:]) != spec.shape[1:]:
            raise ValueError(f"tensor {name!r}: row shape {tuple(rows.shape[1:])} != planned {spec.shape[1:]}")
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else spec.nbytes
        data = _tensor_bytes(rows)
        start = slot.offset + row_start * row_bytes
        if row_start < 0 or start + len(data) > slot.offset + spec.nbytes:
            raise ValueError(f"tensor {name!r}: rows {row_start}..{row_start + len(rows)} out of range")
        if self.tmp_dir is None:
            raise RuntimeError("CheckpointWriter.open() was not called")
        try:
            _pwrite_all(self._fds[slot.shard], data, start)
        except OSError as exc:
            raise CheckpointWriteError(
                f"writing tensor {name!r} to {self.plan.files[slot.shard]} failed: {exc}"
            ) from exc
        with self._lock:
            self._written[name] = self._written.get(name, 0) + len(data)
        if self._flusher is not None:
            self._flusher.wrote(self._fds[slot.shard], len(data))

    @property
    def bytes_written(self) -> int:
        with self._lock:
            return sum(self._written.values())

    # -- side files ------------------------------------------------------------------------
    def _tmp(self, relpath: str) -> Path:
        if self.tmp_dir is None:
            raise RuntimeError("CheckpointWriter.open() was not called")
        p = self.tmp_dir / relpath
        if p.resolve().parent != self.tmp_dir.resolve() and self.tmp_dir.resolve() not in p.resolve().parents:
            raise ValueError(f"refusing to write outside the output folder: {relpath}")
        return p

    def write_text(self, relpath: str, text: str) -> None:
        """Write a small text file into the output folder."""
        try:
            self._tmp(relpath).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CheckpointWriteError(f"writing {relpath} failed: {exc}") from exc

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_text(relpath, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def copy_files(self, src_dir: str | Path, names: Iterable[str], *, links_within: Path | None = None) -> list[str]:
        """Copy the named files that exist in ``src_dir`` (regular files only, or symlinks whose target
        lies inside ``links_within``, as a hub cache snapshot's links into its blobs); return those copied."""
        copied = []
        src_dir = Path(src_dir)
        for name in names:
            src = src_dir / name
            if src.is_file() and (not src.is_symlink() or _link_inside(src, links_within)):
                try:
                    shutil.copyfile(src, self._tmp(name))
                except OSError as exc:
                    raise CheckpointWriteError(f"copying {src} failed: {exc}") from exc
                copied.append(name)
        return copied

    # -- publish ---------------------------------------------------------------------------
    def _index(self) -> dict[str, Any]:
        weight_map = {name: self.plan.files[s.shard] for name, s in self.plan.slots.items()}
        return {"metadata": {"total_size": self.plan.total_tensor_bytes}, "weight_map": weight_map}

    def finalize(self) -> Path:
        """Check completeness, write the index, fsync everything and rename onto the target."""
        if self.tmp_dir is None:
            raise RuntimeError("CheckpointWriter.open() was not called")
        missing = [n for n, s in self.plan.slots.items() if self._written.get(n, 0) != s.spec.nbytes]
        if missing:
            raise RuntimeError(f"{len(missing)} tensor(s) not (fully) written, e.g. {missing[0]!r}")
        try:
            if len(self.plan.files) > 1:
                self.write_json(INDEX_FILE, self._index())
            if self._flusher is not None:
                self._flusher.stop()  # raises the first error of a background sync
            for fd in self._fds:
                os.fsync(fd)
            self._close_fds()
            for p in self.tmp_dir.iterdir():
                if p.is_file() and p.suffix != ".safetensors":
                    fsync_file(p)
            fsync_dir(self.tmp_dir)
            self._publish()
        except OSError as exc:
            raise CheckpointWriteError(f"finishing the output {self.out_dir} failed: {exc}") from exc
        self._finalized = True
        logger.info("wrote %s", self.out_dir)
        return self.out_dir

    def _publish(self) -> None:
        assert self.tmp_dir is not None
        old: Path | None = None
        if self.out_dir.exists() or self.out_dir.is_symlink():
            check_output_dir(self.out_dir, self.overwrite)
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{secrets.token_hex(4)}"
            os.rename(self.out_dir, old)
        try:
            os.rename(self.tmp_dir, self.out_dir)
        except OSError:
            if old is not None:
                os.rename(old, self.out_dir)
            raise
        fsync_dir(self.out_dir.parent)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


class BackgroundSync:
    """Starts ``fdatasync`` of a file in a background thread every ``every`` bytes written to it.

    Only an optimisation of the final ``fsync`` (which still runs): data reaches the disk while
    the caller keeps computing. At most one sync per file is queued or running at a time.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self._pending: dict[int, int] = {}  # fd -> bytes written since its last sync was queued
        self._queued: set[int] = set()
        self._cond = threading.Condition()
        self._error: OSError | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def wrote(self, fd: int, nbytes: int) -> None:
        with self._cond:
            if self._stopping:
                return
            self._pending[fd] = self._pending.get(fd, 0) + nbytes
            if self._pending[fd] < self.every or fd in self._queued:
                return
            self._pending[fd] = 0
            self._queued.add(fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="umm-fdatasync", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._stopping:
                    self._cond.wait()
                if not self._queued:
                    return
                fd = next(iter(self._queued))
            try:
                _datasync(fd)
            except OSError as exc:
                with self._cond:
                    self._error = self._error or exc
            with self._cond:
                self._queued.discard(fd)
                self._cond.notify_all()

    def stop(self) -> None:
        """Let the queued syncs finish, end the thread; raise the first sync error, if any."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        if self._error is not None:
            raise self._error


def _link_inside(link: Path, root: Path | None) -> bool:
    """Whether the symlink ``link`` resolves to a file inside ``root`` (never when ``root`` is ``None``)."""
    if root is None:
        return False
    return Path(root).resolve() in link.resolve().parents


def partial_prefix(out_dir: str | Path) -> str:
    """Name prefix of the temporary folders of an output ``out_dir`` (beside it)."""
    return f".{Path(out_dir).name}.partial-"


def check_output_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an existing, non-empty output folder unless ``overwrite`` (an empty one is fine)."""
    p = Path(out_dir)
    if p.is_symlink() or p.exists():
        if p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
            return
        if not overwrite:
            raise OutputExistsError(
                f"output folder {p} already exists; choose another folder or pass --overwrite "
                "(the old folder is then replaced only once the new model is complete)"
            )
        if not p.is_dir():
            raise OutputExistsError(f"output path {p} exists and is not a folder; remove it first")


def card_base_models(sources: Sequence[str]) -> list[str]:
    """The hub ids among ``sources`` as the card's ``base_model`` lists them: ``org/name`` of each
    reference written as ``org/name``, ``org/name@rev`` or ``org/name+adapter`` (the revision and
    the adapter dropped); references written as other paths (``./x``, ``/abs/x``) are not ids."""
    from umm.checkpoints.hub import parse_repo_id

    out: list[str] = []
    for s in sources:
        repo = parse_repo_id(s.partition("+")[0])
        if repo is not None and repo not in out:
            out.append(repo)
    return out


def model_card(
    *,
    method: str,
    sources: Sequence[str],
    base_model: str | None,
    recipe: Mapping[str, Any],
    recipe_yaml: str,
    out_dtype: str,
    version: str,
    scores: Mapping[str, float] | None = None,
    date: _dt.datetime | None = None,
) -> str:
    """The README.md model card of a merge, built with :class:`huggingface_hub.ModelCard`.

    Card data: ``base_model`` (:func:`card_base_models` of ``sources``) with
    ``base_model_relation: merge``, ``library_name: transformers``, ``tags`` (merge, umm, the
    method), and under ``umm`` the ``recipe`` (its plain-data form, as its YAML reads) and the
    ``scores`` when known. The text names every source, the parameters and the recipe YAML.
    The card is parsed back before it is returned, so a card that would not load fails here.
    """
    from huggingface_hub import ModelCard, ModelCardData

    date = date or _dt.datetime.now(_dt.timezone.utc)
    bases = card_base_models(sources)
    umm_data: dict[str, Any] = {"version": version, "method": method, "sources": list(sources),
                                "recipe": _plain_data(recipe)}
    if scores:
        umm_data["scores"] = {k: float(v) for k, v in scores.items()}
    data = ModelCardData(
        base_model=bases or None,
        library_name="transformers",
        tags=["merge", "umm", method],
        umm=umm_data,
        **({"base_model_relation": "merge"} if bases else {}),
    )
    lines = [
        f"# Merged model ({method})",
        "",
        f"Made with umm {version} on {date.strftime('%Y-%m-%d %H:%M UTC')} "
        f"by merging {len(sources)} model(s) with the `{method}` method; weights stored as `{out_dtype}`.",
        "",
        "## Sources",
        "",
    ]
    for s in sources:
        lines.append(f"- `{s}`" + (" (base)" if base_model is not None and s == base_model else ""))
    params = recipe.get("parameters") or {}
    lines += ["", "## Parameters", ""]
    lines += [f"- `{k}`: `{json.dumps(_plain_data(v))}`" for k, v in params.items()] or ["(method defaults)"]
    if scores:
        lines += ["", "## Scores", "", "| task | score |", "|---|---|"]
        lines += [f"| {k} | {float(v):.4f} |" for k, v in scores.items()]
    lines += ["", "## Recipe", "", "Reproduce with `umm merge umm_recipe.yaml OUT_DIR`:", "", "```yaml",
              recipe_yaml.rstrip("\n"), "```", ""]
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    try:
        ModelCard(text)
    except Exception as exc:  # the card must load on the hub: say so before any tensor is written
        raise UmmError(f"the model card does not parse back ({exc}); this is a bug in umm") from None
    return text


def _plain_data(value: Any) -> Any:
    """``value`` as JSON-able plain data: pydantic models dumped, tuples as lists (a recipe's
    filter rules are pydantic models; ``json.dumps`` of them raised ``TypeError``)."""
    if hasattr(value, "model_dump"):
        return _plain_data(value.model_dump(mode="json", exclude_none=True))
    if isinstance(value, Mapping):
        return {str(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    return value
