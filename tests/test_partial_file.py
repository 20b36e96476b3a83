"""PartialFile: a download's file written with O_DIRECT (or through the page cache), resumable."""

from __future__ import annotations

import errno
import os
import time

import pytest

import umm.net.partial_file as pf
from umm.net.partial_file import ALIGN, PartialFile

BUF = 16 * ALIGN  # a small buffer: several direct writes per file


def write_in_pieces(f: PartialFile, data: bytes, piece: int = 10_007) -> None:
    view = memoryview(data)
    for i in range(0, len(data), piece):
        f.write(view[i : i + piece])


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [0, 1, ALIGN - 1, ALIGN, BUF, BUF + 5, 3 * BUF + ALIGN + 17])
def test_bytes_written_are_the_file(tmp_path, direct, size):
    data = os.urandom(size)
    f = PartialFile(tmp_path / "f", direct=direct, buffer_bytes=BUF)
    assert f.direct == (direct and bool(pf._O_DIRECT)) and f.size == 0
    write_in_pieces(f, data)
    assert f.size == size
    f.finish()
    assert (tmp_path / "f").read_bytes() == data


def test_resume_cuts_a_direct_file_back_to_a_block_boundary(tmp_path):
    data = os.urandom(5 * BUF)
    path = tmp_path / "f"
    path.write_bytes(data[: 2 * BUF + 123])
    f = PartialFile(path, buffer_bytes=BUF)
    if not f.direct:
        pytest.skip("no O_DIRECT here")
    assert f.size == 2 * BUF and path.stat().st_size == 2 * BUF
    write_in_pieces(f, data[f.size :])
    f.finish()
    assert path.read_bytes() == data
    buffered = PartialFile(path, direct=False)  # buffered files resume at their size
    assert buffered.size == len(data)
    buffered.abort()


def test_abort_keeps_a_prefix_of_whole_blocks(tmp_path):
    data = os.urandom(BUF + 3 * ALIGN + 99)
    path = tmp_path / "f"
    f = PartialFile(path, buffer_bytes=BUF)
    write_in_pieces(f, data)
    f.abort()
    kept = path.read_bytes()
    assert data.startswith(kept)
    if f.direct:
        assert len(kept) == BUF + 3 * ALIGN


def test_a_filesystem_refusing_direct_writes_falls_back_to_the_page_cache(tmp_path, monkeypatch):
    if not pf._O_DIRECT:
        pytest.skip("no O_DIRECT here")
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):  # the first direct write is refused, as some filesystems do
        if not refused:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(pf.os, "pwrite", pwrite)
    data = os.urandom(3 * BUF + 7)
    f = PartialFile(tmp_path / "f", buffer_bytes=BUF)
    assert f.direct
    write_in_pieces(f, data)
    assert not f.direct and refused == [0]
    f.finish()
    assert (tmp_path / "f").read_bytes() == data


def test_buffered_writes_sync_in_the_background(tmp_path, monkeypatch):
    import umm.checkpoints.writer as writer

    synced: list[int] = []
    real = writer._datasync
    monkeypatch.setattr(writer, "_datasync", lambda fd: (synced.append(fd), real(fd)))
    monkeypatch.setattr(pf, "DEFAULT_SYNC_EVERY", 4 * ALIGN)
    f = PartialFile(tmp_path / "f", direct=False)
    for _ in range(32):  # paced like a download, so the sync thread keeps up
        f.write(os.urandom(2 * ALIGN))
        time.sleep(0.005)
    f.finish()
    assert len(synced) >= 2  # several syncs before the final fsync


def test_buffer_size_must_be_whole_blocks(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        PartialFile(tmp_path / "f", buffer_bytes=ALIGN + 1)
