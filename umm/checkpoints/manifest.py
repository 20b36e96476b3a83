"""Manifests: the list of a model folder's files with sizes and sha256, and its hash.

A manifest identifies a model's bytes: its :attr:`Manifest.hash` (sha256 of the canonical JSON)
is the content address under which stores keep a model and peers announce it. Manifests arrive
from untrusted peers, so :meth:`Manifest.from_dict` validates every field strictly: paths are
relative POSIX paths that cannot leave the folder, sizes are non-negative integers, digests are
64 lowercase hex characters, and the schema version is known.

A manifest's cost on disk is not only its bytes: every entry is a file and every folder of its
paths a directory, so zero-byte files in deep trees would cost inodes while ``total_bytes`` is 0.
Manifests are therefore also bounded by count and shape (defaults, for Hugging Face folders that
hold tens of files in at most a few folders):

- :data:`MAX_MANIFEST_BYTES` (4 MiB) of JSON;
- :data:`MAX_FILES` (10,000) entries;
- :data:`MAX_DIRS` (1,000) distinct folders over all paths;
- :data:`MAX_DEPTH` (16) components per path, each at most :data:`MAX_NAME_CHARS` (255, the
  usual file-name limit) and :data:`MAX_PATH_CHARS` (1024) per path.

Names starting with ``"."`` (temporary and partial downloads, ``.git``) are never part of a
manifest. Symbolic links are refused: a link could make a verified folder read files elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umm.checkpoints.errors import CheckpointError, ManifestMismatchError
from umm.progress import ProgressSink, open_bar

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 4 << 20
MAX_FILES = 10_000
MAX_DIRS = 1_000
MAX_DEPTH = 16
MAX_NAME_CHARS = 255
MAX_PATH_CHARS = 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\:]")


def validate_relative_path(path: Any) -> str:
    """Return ``path`` if it is a safe relative POSIX path, else raise :class:`CheckpointError`.

    Safe: a non-empty string of at most 1024 characters, ``/``-separated into at most 16
    components of at most 255 characters, no empty, ``.``/``..`` or dot-prefixed component, not
    absolute, no backslash, colon or control character.
    """
    if not isinstance(path, str) or not path:
        raise CheckpointError(f"manifest path {path!r} is not a non-empty string")
    if len(path) > MAX_PATH_CHARS:
        raise CheckpointError(f"manifest path {path[:60]!r}... is longer than {MAX_PATH_CHARS} characters")
    if path.startswith("/"):
        raise CheckpointError(f"manifest path {path!r} is absolute")
    if _BAD_CHARS.search(path):
        raise CheckpointError(f"manifest path {path!r} contains a backslash, colon or control character")
    parts = path.split("/")
    if len(parts) > MAX_DEPTH:
        raise CheckpointError(f"manifest path {path[:60]!r}... is {len(parts)} levels deep, more than {MAX_DEPTH}")
    for part in parts:
        if len(part) > MAX_NAME_CHARS:
            raise CheckpointError(f"manifest path {path[:60]!r}... has a component over {MAX_NAME_CHARS} characters")
        if part in ("", ".", ".."):
            raise CheckpointError(f"manifest path {path!r} has an empty, '.' or '..' component")
        if part.startswith("."):
            raise CheckpointError(f"manifest path {path!r} has a hidden (dot-prefixed) component")
    return path


@dataclass(frozen=True, order=True)
class FileEntry:
    """One file: relative POSIX ``path``, ``size`` in bytes, lowercase hex ``sha256``."""

    path: str
    size: int
    sha256: str

    def __post_init__(self) -> None:
        validate_relative_path(self.path)
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise CheckpointError(f"manifest entry {self.path!r}: size {self.size!r} is not a non-negative integer")
        if not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256):
            raise CheckpointError(
                f"manifest entry {self.path!r}: sha256 {self.sha256!r} is not 64 lowercase hex digits"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    """A folder's files, sorted by path, unique; identified by :attr:`hash`."""

    files: tuple[FileEntry, ...]

    def __post_init__(self) -> None:
        if not all(isinstance(e, FileEntry) for e in self.files):
            raise CheckpointError("manifest files must be FileEntry objects")
        files = tuple(sorted(self.files, key=lambda e: e.path))
        if len(files) > MAX_FILES:
            raise CheckpointError(f"manifest lists {len(files)} files, more than the {MAX_FILES} allowed")
        paths = {e.path for e in files}
        if len(paths) != len(files):
            dup = next(e.path for i, e in enumerate(files) if i and files[i - 1].path == e.path)
            raise CheckpointError(f"manifest lists {dup!r} twice")
        folders: set[str] = set()
        for entry in files:
            parts = entry.path.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder in paths:
                    raise CheckpointError(f"manifest lists {folder!r} both as a file and a folder")
                folders.add(folder)
            if len(folders) > MAX_DIRS:
                raise CheckpointError(f"manifest paths span more than {MAX_DIRS} folders")
        object.__setattr__(self, "files", files)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "files": [e.to_dict() for e in self.files]}

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Validate an untrusted dict (e.g. from a peer) and build the manifest; raises CheckpointError."""
        if not isinstance(d, Mapping):
            raise CheckpointError("manifest is not a JSON object")
        if set(d) != {"schema_version", "files"}:
            raise CheckpointError(f"manifest keys {sorted(map(str, d))} are not ['files', 'schema_version']")
        if type(d["schema_version"]) is not int or d["schema_version"] != SCHEMA_VERSION:
            raise CheckpointError(
                f"manifest schema_version {d['schema_version']!r} is not supported (expected {SCHEMA_VERSION}); "
                "upgrade umm"
            )
        files = d["files"]
        if not isinstance(files, list):
            raise CheckpointError("manifest 'files' is not a list")
        if len(files) > MAX_FILES:
            raise CheckpointError(f"manifest lists {len(files)} files, more than the {MAX_FILES} allowed")
        entries = []
        for i, entry in enumerate(files):
            if not isinstance(entry, Mapping) or set(entry) != {"path", "size", "sha256"}:
                raise CheckpointError(f"manifest file entry {i} must have exactly 'path', 'size' and 'sha256'")
            entries.append(FileEntry(entry["path"], entry["size"], entry["sha256"]))
        return cls(tuple(entries))

    def canonical_json(self) -> bytes:
        """Stable bytes: sorted keys, no whitespace, ASCII only, schema version included."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes | str) -> Manifest:
        """Parse untrusted JSON (at most :data:`MAX_MANIFEST_BYTES`); raises CheckpointError."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise CheckpointError(f"manifest is {len(data)} bytes of JSON, more than the {MAX_MANIFEST_BYTES} allowed")
        try:
            return cls.from_dict(json.loads(data))
        except ValueError as e:  # not JSON, not UTF-8, or an integer of more than 4300 digits
            raise CheckpointError(f"manifest is not valid JSON ({e})") from None
        except RecursionError:
            raise CheckpointError("manifest JSON is nested too deeply") from None

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.canonical_json()).hexdigest()

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.files)

    def entry(self, path: str) -> FileEntry | None:
        for e in self.files:
            if e.path == path:
                return e
        return None


def sha256_file(path: str | Path, *, chunk_size: int = 4 << 20, on_chunk: Any = None) -> str:
    """sha256 hex of a file's bytes, read in ``chunk_size`` chunks into one reused buffer.

    ``on_chunk(n)`` (optional) is called with each chunk's length, e.g. a progress bar's update.
    """
    digest = hashlib.sha256()
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            if on_chunk is not None:
                on_chunk(n)
    return digest.hexdigest()


def list_files(folder: str | Path) -> dict[str, int]:
    """Every regular file under ``folder`` (relative POSIX path -> size), skipping dot-names.

    Raises :class:`CheckpointError` for a symlink or a special file (FIFO, socket, device).
    """
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"{root}: is not a folder")
    found: dict[str, int] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.name.startswith("."):
                    continue
                rel = prefix + e.name
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    raise CheckpointError(f"{root}: {rel} is a symbolic link; copy the real file in instead")
                if stat.S_ISDIR(st.st_mode):
                    walk(Path(e.path), rel + "/")
                elif stat.S_ISREG(st.st_mode):
                    found[validate_relative_path(rel)] = st.st_size
                else:
                    raise CheckpointError(f"{root}: {rel} is not a regular file")

    walk(root, "")
    return found


def _hash_files(root: Path, sizes: Mapping[str, int], on_progress: ProgressSink | None,
                desc: str) -> Iterable[FileEntry]:
    bar = open_bar(on_progress, sum(sizes.values()), desc, "B")
    try:
        for rel, size in sizes.items():
            yield FileEntry(rel, size, sha256_file(root / rel, on_chunk=bar.advance))
    finally:
        bar.close()


def build_manifest(folder: str | Path, *, on_progress: ProgressSink | None = None) -> Manifest:
    """Hash every regular file under ``folder`` (dot-names skipped, symlinks refused);
    ``on_progress`` receives a bar of the bytes hashed."""
    root = Path(folder)
    sizes = list_files(root)
    entries = []
    for entry in _hash_files(root, sizes, on_progress, f"hashing {root.name}"):
        actual = (root / entry.path).stat().st_size
        if actual != entry.size:
            raise CheckpointError(f"{root / entry.path}: changed size while being hashed")
        entries.append(entry)
    manifest = Manifest(tuple(entries))
    logger.info("manifest of %s: %d files, %d bytes, %s", root, len(entries), manifest.total_bytes, manifest.hash)
    return manifest


def verify_folder(folder: str | Path, manifest: Manifest, *, on_progress: ProgressSink | None = None) -> None:
    """Check that ``folder`` holds exactly the manifest's files with their sizes and digests.

    Raises :class:`ManifestMismatchError` naming the missing, extra or differing file(s); cheap
    checks (names, sizes) run before any hashing. ``on_progress`` receives a bar of the bytes hashed.
    """
    root = Path(folder)
    sizes = list_files(root)
    expected = {e.path: e for e in manifest.files}
    missing = sorted(set(expected) - set(sizes))
    extra = sorted(set(sizes) - set(expected))
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    for rel in sorted(set(expected) & set(sizes)):
        if sizes[rel] != expected[rel].size:
            problems.append(f"{rel} is {sizes[rel]} bytes, the manifest says {expected[rel].size}")
    if problems:
        raise ManifestMismatchError(f"{root} does not match manifest {manifest.hash[:12]}: " + "; ".join(problems))
    for entry in _hash_files(root, sizes, on_progress, f"verifying {root.name}"):
        want = expected[entry.path].sha256
        if entry.sha256 != want:
            raise ManifestMismatchError(
                f"{root} does not match manifest {manifest.hash[:12]}: {entry.path} has sha256 "
                f"{entry.sha256[:16]}..., the manifest says {want[:16]}..."
            )
