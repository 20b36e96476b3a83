"""Owner-named work folders (``umm.partials``): a later run removes a dead owner's, never a live one's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from umm.partials import owner_alive, partial_path, remove_stale_partials


def test_a_dead_writers_folder_is_removed_and_a_live_ones_kept(tmp_path):
    prefix = ".suite.tmp-"
    # a child process names and fills its own folder, then dies without cleaning up
    code = ("import sys; from umm.partials import partial_path; p = partial_path(sys.argv[1], sys.argv[2]); "
            "p.mkdir(); (p / 'weights').write_bytes(bytes(4096)); print(p)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path), prefix], capture_output=True, text=True,
                           timeout=120, check=True)
    dead = tmp_path / child.stdout.strip().rsplit("/", 1)[-1]
    mine = partial_path(tmp_path, prefix)
    mine.mkdir()
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / f"{prefix}1-1-abcd"  # parses as a dead owner's, but is a link: never followed
    link.symlink_to(target)
    assert dead.is_dir() and dead.name.startswith(prefix)

    assert remove_stale_partials(tmp_path, prefix) == [dead]
    assert not dead.exists() and mine.is_dir() and link.is_symlink() and target.is_dir()
    assert remove_stale_partials(tmp_path / "missing", prefix) == []


def test_owner_alive_tells_a_reused_pid_from_its_owner():
    import os

    start = int(partial_path(".", "x-").name.split("-")[2])  # this process's start, as its folders name it
    assert owner_alive(os.getpid(), start)
    assert not owner_alive(os.getpid(), start - 1000)  # same pid, another start: the owner is gone


def test_a_live_owner_stays_alive_when_the_wall_clock_is_stepped(monkeypatch):
    """The start time of a folder's owner does not move with the wall clock (a VM's clock step made a
    long-running writer's folder look stale): on Linux it is read from boot, not from the epoch."""
    import os
    import time

    import psutil

    if not os.path.exists("/proc/self/stat"):
        pytest.skip("the start time counts from boot on Linux only")
    start = int(partial_path(".", "x-").name.split("-")[2])
    real = psutil.Process.create_time
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: real(self) + 5.0)  # the clock stepped 5 s
    monkeypatch.setattr(time, "time", lambda: 4.0e9)
    assert owner_alive(os.getpid(), start)
