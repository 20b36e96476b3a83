"""Append a download's bytes to its partial file, then make them durable.

A download writes each file once, sequentially, and reads it back only much later (to serve or
load it). Where Linux allows, :class:`PartialFile` therefore writes with ``O_DIRECT``: whole
aligned blocks go from one page-aligned buffer straight to the disk, skipping the page cache.
That costs about a fifth of the CPU of buffered writes plus the ``fdatasync`` calls needed to
keep the final ``fsync`` short, CPU that a download shares with receiving and hashing, and it
does not push the rest of the page cache out. The last, partial block is written padded to the
alignment and the file truncated back to its size.

Where ``O_DIRECT`` is refused (other systems, tmpfs, a filesystem that rejects it at the first
write) the bytes are written through the page cache, with ``fdatasync`` started in the
background every :data:`umm.checkpoints.writer.DEFAULT_SYNC_EVERY` bytes.

Contract: :attr:`PartialFile.size` is where the caller must continue (a resumed direct file is
first cut back to a multiple of :data:`ALIGN`); after :meth:`PartialFile.finish` every byte
written is on disk (``fsync``); after :meth:`PartialFile.abort` the file holds a prefix of what
was written (whole blocks), for a later resume.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from pathlib import Path

from umm.checkpoints.writer import DEFAULT_SYNC_EVERY, BackgroundSync

logger = logging.getLogger(__name__)

#: offset, length and buffer alignment of direct writes (the largest logical block size in use)
ALIGN = 4096
#: bytes gathered before one direct write
DEFAULT_BUFFER = 8 << 20
_O_DIRECT = getattr(os, "O_DIRECT", 0)


class PartialFile:
    """Appends to ``path`` (created if missing); see the module docstring for the contract."""

    def __init__(self, path: str | os.PathLike[str], *, direct: bool = True, buffer_bytes: int = DEFAULT_BUFFER):
        if buffer_bytes <= 0 or buffer_bytes % ALIGN:
            raise ValueError(f"buffer_bytes must be a positive multiple of {ALIGN}")
        self.path = Path(path)
        self._fd = -1
        self._buf: mmap.mmap | None = None
        self._fill = 0
        self._sync: BackgroundSync | None = None
        if direct and _O_DIRECT:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | _O_DIRECT, 0o644)
            except OSError as e:  # EINVAL: this filesystem has no direct I/O
                logger.debug("no O_DIRECT for %s: %s", self.path, e)
        if self._fd >= 0:
            size = os.fstat(self._fd).st_size
            self.size = size - size % ALIGN
            if self.size != size:
                os.ftruncate(self._fd, self.size)
            self._buf = mmap.mmap(-1, buffer_bytes)  # anonymous: page-aligned
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            self.size = os.fstat(self._fd).st_size
            self._sync = BackgroundSync(DEFAULT_SYNC_EVERY)
        self._flushed = self.size  # file offset where the buffer's first byte goes

    @property
    def direct(self) -> bool:
        return self._buf is not None

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` (on disk by :meth:`finish`)."""
        view = memoryview(data).cast("B")
        self.size += len(view)
        while view:
            if self._buf is None:  # buffered from the start, or direct I/O refused midway
                self._write_buffered(view)
                return
            n = min(len(view), len(self._buf) - self._fill)
            self._buf[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == len(self._buf):
                self._flush_blocks()

    def finish(self) -> None:
        """Write what is buffered, fsync and close; raises the OSError of a failed write or sync."""
        try:
            if self._buf is not None and self._fill:
                tail = self._fill % ALIGN
                if tail:  # pad the last block; the truncate below drops the padding
                    pad = ALIGN - tail
                    self._buf[self._fill : self._fill + pad] = bytes(pad)
                    self._fill += pad
                self._flush_blocks()
                os.ftruncate(self._fd, self.size)
            if self._sync is not None:
                self._sync.stop()
                self._sync = None
            os.fsync(self._fd)
        finally:
            self._close()

    def abort(self) -> None:
        """Keep the whole blocks written so far (best effort) and close, for a later resume."""
        try:
            if self._buf is not None and self._fill >= ALIGN:
                self._fill -= self._fill % ALIGN
                self._flush_blocks()
            if self._sync is not None:
                self._sync.stop()
        except OSError as e:
            logger.debug("keeping less of %s: %s", self.path, e)
        finally:
            self._sync = None
            self._close()

    def _flush_blocks(self) -> None:
        """Write ``_buf[:_fill]`` (whole blocks) at ``_flushed``."""
        whole = memoryview(self._buf)
        with whole, whole[: self._fill] as view:
            try:
                _pwrite_all(self._fd, view, self._flushed)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                why, pending = str(e), bytes(view)  # not e: its traceback may hold views of _buf
            else:
                self._flushed += len(view)
                self._fill = 0
                return
        self._stop_direct(why, pending)

    def _stop_direct(self, why: str, pending: bytes) -> None:
        """The filesystem refused a direct write: go on through the page cache, from ``pending``."""
        import fcntl

        logger.debug("O_DIRECT refused for %s (%s): writing through the page cache", self.path, why)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self._buf.close()
        self._buf, self._fill = None, 0
        self._sync = BackgroundSync(DEFAULT_SYNC_EVERY)
        self._write_buffered(memoryview(pending))

    def _write_buffered(self, view: memoryview) -> None:
        _pwrite_all(self._fd, view, self._flushed)
        self._flushed += len(view)
        if self._sync is not None:
            self._sync.wrote(self._fd, len(view))

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._buf is not None:
            self._buf.close()
            self._buf = None


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (a write may write fewer bytes than asked)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
