"""One switch turns every speed trick off: ``UMM_SPEEDUPS=0`` gives the plain behaviour."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from umm import speedups


@pytest.fixture
def switched_off(monkeypatch):
    monkeypatch.setenv(speedups.SWITCH, "0")


def test_switch_reads_the_environment_on_every_call(monkeypatch):
    monkeypatch.delenv(speedups.SWITCH, raising=False)
    assert speedups.enabled()
    monkeypatch.setenv(speedups.SWITCH, "0")
    assert not speedups.enabled()
    monkeypatch.setenv(speedups.SWITCH, "1")
    assert speedups.enabled()


def test_switched_off_tune_allocator_never_loads_libc(switched_off, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("mallopt reached with the switch off")

    monkeypatch.setattr(ctypes, "CDLL", refuse)
    assert speedups.tune_allocator() is False


@pytest.mark.parametrize("code, status", [(3, 3), (None, None), ("bad thing", "bad thing")])
def test_switched_off_fast_exit_is_sys_exit(switched_off, code, status):
    # the plain path raises SystemExit in this process (the fast one would end the test run)
    with pytest.raises(SystemExit) as exc:
        speedups.fast_exit(code)
    assert exc.value.code == status


def _freeze_count_after_import(env_value: str) -> int:
    code = ("import gc; from umm.speedups import import_frozen; import_frozen('umm.merge.recipe'); "
            "import sys; assert 'umm.merge.recipe' in sys.modules and gc.isenabled(); "
            "print(gc.get_freeze_count())")
    env = {**os.environ, speedups.SWITCH: env_value}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_switched_off_import_frozen_imports_without_freezing():
    # in fresh interpreters: this one has imported torch, where import_frozen never freezes
    assert _freeze_count_after_import("0") == 0
    assert _freeze_count_after_import("1") > 100_000


def test_switched_off_freeze_for_exit_freezes_nothing(switched_off, monkeypatch):
    import gc

    def refuse():
        raise AssertionError("gc.freeze reached with the switch off")

    monkeypatch.setattr(gc, "freeze", refuse)
    speedups.freeze_for_exit()
