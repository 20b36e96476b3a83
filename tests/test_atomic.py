"""Atomic file writes (``umm.atomic``): whole files or none, no temp left behind, modes kept."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from umm.atomic import (
    atomic_path,
    remove_stale_temps,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_writes_bytes_text_and_json_and_leaves_no_temp(tmp_path):
    assert write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    write_text_atomic(tmp_path / "sub" / "b.txt", "héllo\n")  # the parent folder is created
    write_json_atomic(tmp_path / "c.json", {"x": [1, 2]}, indent=2, trailing_newline=True)
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "sub" / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert (tmp_path / "c.json").read_text() == json.dumps({"x": [1, 2]}, indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "c.json", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["b.txt"]


def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(TypeError):
        write_json_atomic(target, {"not json": object()})
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_the_temp_is_a_hidden_sibling_ending_in_tmp(tmp_path):
    with atomic_path(tmp_path / "model.safetensors") as tmp:
        assert tmp.parent == tmp_path and tmp.is_file()
        assert tmp.name.startswith(".model.safetensors.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"w")
    assert (tmp_path / "model.safetensors").read_bytes() == b"w"


def test_a_requested_mode_is_kept_and_the_default_follows_the_umask(tmp_path):
    key = write_bytes_atomic(tmp_path / "key", b"secret", mode=0o400)
    assert stat.S_IMODE(key.stat().st_mode) == 0o400
    umask = os.umask(0o022)
    try:
        plain = write_text_atomic(tmp_path / "plain", "x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o644


def test_concurrent_writers_of_one_path_never_collide_or_mix(tmp_path):
    target = tmp_path / "shared.json"
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(40):
                write_json_atomic(target, {"writer": i, "round": j, "pad": "x" * (1000 * i)})
                json.loads(target.read_text())  # always a whole file of some writer
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    data = json.loads(target.read_text())
    assert data["round"] == 39 and data["pad"] == "x" * (1000 * data["writer"])
    assert [p.name for p in tmp_path.iterdir()] == ["shared.json"]


def test_a_dead_writers_temp_is_removed_and_a_live_ones_kept(tmp_path):
    code = ("import os, sys; from umm.atomic import atomic_path; "
            "cm = atomic_path(sys.argv[1]); print(cm.__enter__().name); sys.stdout.flush(); os._exit(0)")
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path / "index.json")], capture_output=True,
                           text=True, timeout=120, check=True)
    dead = tmp_path / child.stdout.strip()
    mine = atomic_path(tmp_path / "index.json")
    live = mine.__enter__()
    other = tmp_path / ".notes.tmp"  # not our naming: left alone
    other.write_text("")
    assert dead.is_file()
    assert remove_stale_temps(tmp_path) == [dead]
    assert live.is_file() and other.is_file()
    mine.__exit__(None, None, None)
    assert (tmp_path / "index.json").is_file() and not live.exists()
    assert remove_stale_temps(tmp_path / "missing") == []
