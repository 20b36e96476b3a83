"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every writer of a file that must not be seen half-written goes through :func:`atomic_path` (or
its three shorthands :func:`write_bytes_atomic`, :func:`write_text_atomic` and
:func:`write_json_atomic`). One policy for all of them:

1. the bytes go to a fresh hidden sibling ``.<name>.<pid>-<start>-<random>.tmp`` (created
   exclusively, so two writers of one path never share a temp file; the owner's pid and start
   time let :func:`remove_stale_temps` tell a dead writer's leftovers from a live one's);
2. the temp file is fsynced, given the requested mode, and renamed onto the target
   (``os.replace``: atomic on POSIX, and the last of concurrent writers wins whole);
3. the folder is fsynced where the platform supports it, so the rename survives a power loss;
4. on any exception (Ctrl-C included) the temp file is removed and the target is untouched.

Whole folders are published the same way by :mod:`umm.partials` (a hidden sibling folder, then
one rename).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from umm.partials import owner_alive, partial_path

#: fsync errors that mean "this filesystem or platform cannot sync a folder", not a failed write
_DIR_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EISDIR, errno.EACCES}
_TEMP_NAME = re.compile(r"\..+\.(\d+)-(\d+)-[0-9a-f]+\.tmp")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush the file at ``path`` to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush the entries of the folder ``path`` (renames into it) to the disk, where supported.

    A platform or filesystem that cannot open or sync a folder is skipped; a real I/O error raises.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def temp_path_for(path: Path) -> Path:
    """A fresh, not yet existing temp name beside ``path`` owned by this process."""
    return Path(f"{partial_path(path.parent, f'.{path.name}.')}.tmp")


def _create_temp(path: Path, mode: int | None) -> Path:
    """Create (exclusively) and return an empty temp file beside ``path``."""
    while True:
        tmp = temp_path_for(path)
        try:
            # a requested mode is applied before the rename; until then only the owner may write
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is not None else 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path to write; on a clean exit it replaces ``path`` (see the module docstring).

    For writers that need a file name (safetensors, torch, matplotlib, ``shutil.copyfile``).
    The temp file exists (empty) when yielded and ends in ``.tmp``: pass a writer that infers the
    format from the suffix the format explicitly. ``mode`` (e.g. ``0o400``) is set on the
    finished file; without it the file gets the usual ``0o666`` less the umask. The parent folder
    is created if missing.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(target, mode)
    try:
        yield tmp
        fsync_file(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"), mode=mode)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = None,
                      trailing_newline: bool = False) -> Path:
    """Write ``obj`` as JSON (UTF-8) to ``path`` atomically; returns the path."""
    text = json.dumps(obj, indent=indent)
    return write_text_atomic(path, text + "\n" if trailing_newline else text)


def remove_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temp files in ``folder`` left by writers that are gone (killed mid-write).

    A live writer's temp file, and any name that does not parse, stays. Returns the removed paths.
    """
    removed = []
    with contextlib.suppress(OSError):
        for p in Path(folder).iterdir():
            m = _TEMP_NAME.fullmatch(p.name)
            if m is None or not p.is_file() or owner_alive(int(m.group(1)), int(m.group(2))):
                continue
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
