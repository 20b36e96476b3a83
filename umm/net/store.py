"""Content-addressed model store: complete, verified models only, by manifest hash.

Layout under a data directory::

    models/<manifest hash>/            a complete model (its files, as listed in its manifest)
    models/<manifest hash>/.umm-manifest.json   the canonical manifest bytes (dot-names are
                                       never part of a manifest, so the folder still verifies)
    partial/<manifest hash>/           a download or import in progress, same layout
    partial/<manifest hash>.lock       held while one process fills that partial folder
    quarantine/<manifest hash>/        a complete, verified model from an untrusted contributor,
                                       not yet admitted: never served, never listed

A model enters ``models/`` (or ``quarantine/``) only by one ``rename`` of its partial folder after
every file has the size and sha256 of the manifest, so readers never see a half-written model,
and a crash leaves at most a partial folder (which the next download resumes). A quarantined
model enters ``models/`` by :meth:`ModelStore.promote` (one rename) once admission accepts it, or
is dropped by :meth:`ModelStore.discard`.

Abandoned partial folders (no download holds their lock) are not kept forever:
:meth:`ModelStore.reclaim` deletes those older than a maximum age, then the oldest until the
abandoned bytes fit a budget; quarantined models older than the maximum age go too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from umm.atomic import atomic_path, fsync_dir, fsync_file, write_bytes_atomic
from umm.checkpoints.errors import CheckpointError
from umm.checkpoints.manifest import Manifest, build_manifest, list_files, verify_folder
from umm.net.errors import ModelNotFoundError, StoreError

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".umm-manifest.json"
_HASH = re.compile(r"[0-9a-f]{64}")


def check_hash(manifest_hash: str) -> str:
    """``manifest_hash`` if it is 64 lowercase hex digits, else :class:`StoreError`."""
    if not isinstance(manifest_hash, str) or not _HASH.fullmatch(manifest_hash):
        raise StoreError(f"invalid manifest hash {manifest_hash!r}: expected 64 lowercase hex digits")
    return manifest_hash


def _tree_usage(folder: Path) -> tuple[float, int]:
    """(latest mtime, total bytes) of the files under ``folder``, links not followed."""
    latest, total = folder.lstat().st_mtime, 0
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(parent, name))
                latest = max(latest, st.st_mtime)
                total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return latest, total


class ModelStore:
    """The models of one data directory (see module docstring)."""

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.data_dir = Path(data_dir)
        self.models_dir = self.data_dir / "models"
        self.partial_dir = self.data_dir / "partial"
        self.quarantine_dir = self.data_dir / "quarantine"
        for d in (self.models_dir, self.partial_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)

    # queries --------------------------------------------------------------------------------
    def has(self, manifest_hash: str) -> bool:
        return (self.models_dir / check_hash(manifest_hash) / MANIFEST_NAME).is_file()

    def path(self, manifest_hash: str) -> Path:
        """Folder of a complete model; :class:`ModelNotFoundError` when the store lacks it."""
        if not self.has(manifest_hash):
            raise ModelNotFoundError(f"model {manifest_hash[:12]} is not in the store {self.models_dir}")
        return self.models_dir / manifest_hash

    def manifest(self, manifest_hash: str) -> Manifest:
        """The stored manifest of a model, checked against its hash."""
        raw = (self.path(manifest_hash) / MANIFEST_NAME).read_bytes()
        if hashlib.sha256(raw).hexdigest() != manifest_hash:
            raise StoreError(f"{self.models_dir / manifest_hash}: stored manifest does not match its hash; remove it")
        return Manifest.from_json(raw)

    def list(self) -> list[str]:
        """Manifest hashes of the complete models, sorted."""
        return sorted(p.name for p in self.models_dir.iterdir() if _HASH.fullmatch(p.name) and self.has(p.name))

    def quarantined(self, manifest_hash: str) -> bool:
        """Whether a complete model waits in quarantine (downloaded, not yet admitted)."""
        return (self.quarantine_dir / check_hash(manifest_hash) / MANIFEST_NAME).is_file()

    def candidate_path(self, manifest_hash: str) -> Path:
        """Folder to examine for admission: the quarantined copy, else the stored model."""
        if self.quarantined(manifest_hash):
            return self.quarantine_dir / manifest_hash
        return self.path(manifest_hash)

    def _delete(self, folder: Path) -> bool:
        """Move ``folder`` aside (it disappears at once), then delete it; False if it was absent."""
        trash = self.partial_dir / f".trash-{folder.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def remove(self, manifest_hash: str) -> bool:
        """Delete a model, stored or quarantined; False if it was absent."""
        gone = self._delete(self.quarantine_dir / check_hash(manifest_hash))
        if self._delete(self.models_dir / manifest_hash):
            logger.info("removed model %s from %s", manifest_hash[:12], self.models_dir)
            return True
        return gone

    def promote(self, manifest_hash: str) -> Path:
        """Move an admitted model from quarantine into the served store (idempotent); its folder.

        :class:`ModelNotFoundError` when the model is neither quarantined nor stored.
        """
        src = self.quarantine_dir / check_hash(manifest_hash)
        if self.has(manifest_hash):
            self._delete(src)
            return self.models_dir / manifest_hash
        if not self.quarantined(manifest_hash):
            raise ModelNotFoundError(f"model {manifest_hash[:12]} is not in quarantine {self.quarantine_dir}")
        target = self.models_dir / manifest_hash
        if target.exists():  # leftover without a manifest (e.g. a crashed removal): replace it
            shutil.rmtree(target)
        os.rename(src, target)
        fsync_dir(self.models_dir)
        fsync_dir(self.quarantine_dir)
        logger.info("model %s admitted into the store", manifest_hash[:12])
        return target

    def discard(self, manifest_hash: str) -> bool:
        """Delete a quarantined model (e.g. refused by admission); False if none was there."""
        return self._delete(self.quarantine_dir / check_hash(manifest_hash))

    def reclaim(self, *, budget: int, max_age: float, keep: str | None = None) -> list[str]:
        """Delete abandoned partial downloads; returns the hashes deleted.

        A partial folder is abandoned when no download holds its lock. Those last written more
        than ``max_age`` seconds ago go first; then the oldest go until the abandoned bytes are at
        most ``budget``. ``keep`` (the download about to start) is never deleted. Quarantined
        models older than ``max_age`` go too (admission never took them).
        """
        now = time.time()
        abandoned: list[tuple[float, int, str]] = []
        for folder in self.partial_dir.iterdir():
            h = folder.name
            if h == keep or not _HASH.fullmatch(h) or not folder.is_dir():
                continue
            try:
                with self.lock(h, blocking=False):
                    mtime, size = _tree_usage(folder)
            except StoreError:  # a download is filling it right now
                continue
            abandoned.append((mtime, size, h))
        abandoned.sort()
        total = sum(size for _, size, _ in abandoned)
        removed = []
        for mtime, size, h in abandoned:
            if now - mtime <= max_age and total <= budget:
                break
            with contextlib.suppress(StoreError), self.lock(h, blocking=False):
                if self._delete(self.partial_dir / h):
                    removed.append(h)
                    total -= size
                    logger.info("reclaimed the abandoned partial download of %s (%d bytes)", h[:12], size)
        for folder in self.quarantine_dir.iterdir():
            if _HASH.fullmatch(folder.name) and now - _tree_usage(folder)[0] > max_age and self._delete(folder):
                removed.append(folder.name)
                logger.info("reclaimed quarantined model %s (never admitted)", folder.name[:12])
        return removed

    # filling ---------------------------------------------------------------------------------
    def partial_path(self, manifest_hash: str) -> Path:
        return self.partial_dir / check_hash(manifest_hash)

    @contextlib.contextmanager
    def lock(self, manifest_hash: str, *, blocking: bool = True) -> Iterator[None]:
        """Exclusive (inter-process) lock on filling ``manifest_hash``; StoreError if busy and not blocking."""
        lock_path = self.partial_dir / f"{check_hash(manifest_hash)}.lock"
        with open(lock_path, "a+b") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                raise StoreError(f"model {manifest_hash[:12]} is being written by another process") from None
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def begin(self, manifest: Manifest) -> Path:
        """The partial folder for ``manifest`` (created, manifest written); keeps files already there."""
        folder = self.partial_path(manifest.hash)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / MANIFEST_NAME
        raw = manifest.canonical_json()
        if not target.is_file() or target.read_bytes() != raw:
            write_bytes_atomic(target, raw)
        return folder

    def commit(self, manifest: Manifest, *, verify: bool = True, quarantine: bool = False) -> Path:
        """Move the complete partial folder of ``manifest`` into ``models/`` in one rename.

        Checks that it holds exactly the manifest's files with their sizes (and, with ``verify``,
        their sha256; pass False only when the caller hashed every byte as it wrote it). Raises
        :class:`StoreError` and leaves the partial folder in place when it does not match. With
        ``quarantine`` the model goes to ``quarantine/`` instead, until :meth:`promote`.
        """
        h = manifest.hash
        folder = self.partial_path(h)
        area = self.quarantine_dir if quarantine else self.models_dir
        target = area / h
        if self.has(h) or (quarantine and self.quarantined(h)):
            shutil.rmtree(folder, ignore_errors=True)
            return self.models_dir / h if self.has(h) else target
        if not folder.is_dir():
            raise StoreError(f"nothing to commit for model {h[:12]}: {folder} does not exist")
        self.begin(manifest)  # make sure the manifest file is there and right
        try:
            if verify:
                verify_folder(folder, manifest)
            else:
                sizes = list_files(folder)
                want = {e.path: e.size for e in manifest.files}
                if sizes != want:
                    missing = sorted(set(want) - set(sizes))
                    extra = sorted(set(sizes) - set(want))
                    wrong = sorted(p for p in set(want) & set(sizes) if want[p] != sizes[p])
                    raise StoreError(
                        f"{folder} is not complete for model {h[:12]}: missing {missing}, unexpected {extra}, "
                        f"wrong size {wrong}"
                    )
        except CheckpointError as e:
            raise StoreError(f"cannot commit model {h[:12]}: {e}") from e
        for e in manifest.files:
            fsync_file(folder / e.path)
        if target.exists():  # leftover without a manifest (e.g. a crashed removal): replace it
            shutil.rmtree(target)
        os.rename(folder, target)
        fsync_dir(area)
        fsync_dir(self.partial_dir)
        logger.info("model %s entered %s (%d files, %d bytes)", h[:12], area, len(manifest.files), manifest.total_bytes)
        return target

    def add_folder(self, folder: str | os.PathLike[str], manifest: Manifest | None = None) -> str:
        """Copy a local model folder into the store (verified); returns its manifest hash.

        Without ``manifest`` the folder is hashed first. The copy is verified against the
        manifest before it enters the store, so a folder changed during the copy is refused.
        """
        src = Path(folder)
        manifest = manifest if manifest is not None else build_manifest(src)
        h = manifest.hash
        if self.has(h):
            return h
        with self.lock(h):
            dst = self.begin(manifest)
            for e in manifest.files:
                out = dst / e.path
                out.parent.mkdir(parents=True, exist_ok=True)
                if out.is_file() and out.stat().st_size == e.size:
                    continue  # from an interrupted earlier import; verified below
                with atomic_path(out) as tmp:
                    shutil.copyfile(src / e.path, tmp)
            try:
                self.commit(manifest, verify=True)
            except StoreError:
                shutil.rmtree(dst, ignore_errors=True)
                raise
        return h
