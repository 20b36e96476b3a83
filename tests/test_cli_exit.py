"""The ``umm`` console script ends without interpreter teardown, but as ``sys.exit`` would."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("code, status, err", [("3", 3, ""), ("None", 0, ""), ("'bad thing'", 1, "bad thing")])
def test_fast_exit_runs_atexit_flushes_and_keeps_the_status(code, status, err):
    proc = _run("import atexit, sys; from umm.speedups import fast_exit; "
                "atexit.register(lambda: print('atexit ran')); "
                f"sys.stdout.write('buffered '); fast_exit({code})")
    assert proc.returncode == status
    assert proc.stdout == "buffered atexit ran\n"
    assert err in proc.stderr


def test_fast_exit_waits_for_running_non_daemon_threads(tmp_path):
    marker = tmp_path / "done"
    proc = _run("import threading, time; from umm.speedups import fast_exit; "
                f"t = threading.Thread(target=lambda: (time.sleep(0.5), open({str(marker)!r}, 'w').close())); "
                "t.start(); fast_exit(0)")
    assert proc.returncode == 0 and marker.exists()


def test_console_script_keeps_exit_codes_and_messages(tmp_path):
    entry = "from umm.cli import console_main; console_main()"
    ok = _run(entry, "--help")
    assert ok.returncode == 0 and "merge" in ok.stdout
    bad = _run(entry, "merge", str(tmp_path / "nope.yaml"), str(tmp_path / "out"))
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr
    usage = _run(entry, "merge")
    assert usage.returncode == 2 and "Missing argument" in usage.stderr
