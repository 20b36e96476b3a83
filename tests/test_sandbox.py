"""The sandbox contains hostile programs and reports them as failures (guard off: OS-level)."""

from __future__ import annotations

import os
import select
import socket
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from umm.eval.sandbox import SandboxLimits, run_program, run_programs

# the OS-level walls only: the reliability guard would stop most attacks before the kernel does
RAW = SandboxLimits(timeout_seconds=5.0, cpu_seconds=5, guard=False)


def _probe() -> dict:
    return run_program("x = 1\n", RAW).applied


APPLIED = _probe()
needs_landlock = pytest.mark.skipif(not APPLIED.get("landlock_abi"), reason="Landlock not available on this kernel")
needs_netns = pytest.mark.skipif(not APPLIED.get("netns") and APPLIED.get("landlock_abi", 0) < 4, reason="no netns nor Landlock net")


def test_good_and_bad_programs_are_told_apart() -> None:
    ok = run_program("import math\nassert math.gcd(12, 18) == 6\nprint('hi')\n", RAW)
    assert ok.passed and ok.status == "passed" and ok.stdout == "hi\n"
    bad = run_program("assert 1 + 1 == 3\n", RAW)
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr
    syntax = run_program("def f(:\n", RAW)
    assert not syntax.passed


@pytest.mark.parametrize("code", ["import os\nos._exit(0)\n", "import sys\nsys.exit(0)\n", "raise SystemExit\n"])
def test_exiting_early_is_not_a_pass(code: str) -> None:
    assert not run_program(code, RAW).passed


def test_infinite_loop_times_out() -> None:
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", SandboxLimits(timeout_seconds=1.0, cpu_seconds=5, guard=False))
    assert r.status == "timed out" and not r.passed
    assert time.monotonic() - t0 < 8


def test_sleeping_program_times_out() -> None:
    r = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_seconds=1.0, guard=False))
    assert r.status == "timed out"


def test_memory_bomb_is_contained() -> None:
    r = run_program("x = bytearray(8 << 30)\n", RAW)
    assert not r.passed and "MemoryError" in r.stderr
    capped = SandboxLimits(timeout_seconds=5.0, guard=False, memory_bytes=256 << 20)
    r = run_program("xs = []\nwhile True:\n    xs.append(bytearray(16 << 20))\n", capped)
    assert not r.passed and "MemoryError" in r.stderr
    assert run_program("x = bytearray(32 << 20)\n", capped).passed  # under the cap is fine


def test_fork_bomb_is_contained_and_leaves_no_process() -> None:
    code = textwrap.dedent(
        """
        import os, time
        for _ in range(10000):
            try:
                if os.fork() == 0:
                    os.setsid()  # try to escape the process group
            except OSError:
                time.sleep(0.01)
        time.sleep(100)
        """
    )
    r = run_program(code, SandboxLimits(timeout_seconds=2.0, cpu_seconds=5, guard=False, max_processes=16))
    assert not r.passed
    time.sleep(0.5)
    sandbox_uid = r.applied.get("uid")
    leftovers = []
    for p in psutil.process_iter(["uids", "cmdline"]):
        try:
            if sandbox_uid not in (None, 0) and p.info["uids"] and p.info["uids"].real == sandbox_uid:
                leftovers.append(p.pid)
        except psutil.Error:
            pass
    assert leftovers == [], "processes of the sandbox survived"
    assert run_program("assert 2 + 2 == 4\n", RAW).passed  # the machine still works


def test_rm_rf_home_keeps_the_real_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    sentinel = home / "sentinel.txt"
    sentinel.write_text("keep me")
    monkeypatch.setenv("HOME", str(home))
    r = run_program(f"import os\nos.system('rm -rf ~ {home}')\nimport shutil\nshutil.rmtree({str(home)!r})\n", RAW)
    assert not r.passed
    assert sentinel.read_text() == "keep me"


@needs_landlock
def test_writes_outside_scratch_are_blocked_even_where_permissions_allow() -> None:
    open_dir = Path(tempfile.mkdtemp(prefix="umm-open-"))
    try:
        os.chmod(open_dir, 0o777)  # anyone may write here: only Landlock stands in the way
        victim = open_dir / "existing.txt"
        victim.write_text("original")
        os.chmod(victim, 0o666)
        code = textwrap.dedent(
            f"""
            import os
            results = []
            for action in (
                lambda: open({str(open_dir / 'new.txt')!r}, 'w').write('x'),
                lambda: open({str(victim)!r}, 'w').write('pwned'),
                lambda: os.remove({str(victim)!r}),
                lambda: os.mkdir({str(open_dir / 'd')!r}),
            ):
                try:
                    action()
                    results.append('done')
                except OSError:
                    results.append('blocked')
            open('inside.txt', 'w').write('scratch is writable')
            assert open('inside.txt').read() == 'scratch is writable'
            assert results == ['done'] * 4, results
            """
        )
        r = run_program(code, RAW)
        assert not r.passed and "blocked" in r.stderr
        assert sorted(p.name for p in open_dir.iterdir()) == ["existing.txt"]
        assert victim.read_text() == "original"
    finally:
        for p in open_dir.iterdir():
            p.unlink() if p.is_file() else p.rmdir()
        open_dir.rmdir()


def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cr3t-" + os.urandom(6).hex()
    monkeypatch.setenv("UMM_TEST_SECRET", secret)
    code = textwrap.dedent(
        f"""
        import os
        found = {secret!r} in repr(dict(os.environ))
        for pid in ({os.getpid()}, os.getppid(), 1):
            try:
                found = found or {secret!r}.encode() in open('/proc/%d/environ' % pid, 'rb').read()
            except OSError:
                pass
        assert found
        """
    )
    r = run_program(code, RAW)
    assert not r.passed
    env = run_program("import os\nprint(sorted(os.environ))\n", RAW)
    assert env.passed and env.stdout.strip() == "['HOME', 'LANG', 'PATH', 'TMPDIR']"


@needs_netns
def test_no_network() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", RAW)
        assert not r.passed
        assert any(e in r.stderr for e in ("Network is unreachable", "Connection refused", "Permission denied", "OSError"))
        # a connection would wait in the listen backlog even without accept()
        ready, _, _ = select.select([server], [], [], 0.2)
        assert ready == []
    finally:
        server.close()


def test_scratch_dir_is_fresh_and_removed() -> None:
    r = run_program("import os\nprint(os.getcwd())\nprint(os.listdir('.'))\nopen('f', 'w').write('x')\n", RAW)
    assert r.passed
    cwd, listing = r.stdout.splitlines()
    assert listing == "[]"
    assert not Path(cwd).exists()


def test_evaluator_keeps_going_after_attacks() -> None:
    programs = [
        "while True: pass\n",
        "x = bytearray(8 << 30)\n",
        "import os\nos.system('rm -rf ~')\n",
        "assert sum(range(5)) == 10\n",
    ]
    results = run_programs(programs, SandboxLimits(timeout_seconds=1.5), workers=2)
    assert [r.passed for r in results] == [False, False, False, True]
    assert results[0].status == "timed out"


def test_guard_disables_destructive_calls() -> None:
    r = run_program("import os\nos.system('true')\n", SandboxLimits())
    assert not r.passed and "NoneType" in r.stderr
    r = run_program("import shutil, subprocess\nassert shutil.rmtree is None and subprocess.Popen is None\n", SandboxLimits())
    assert r.passed
    assert run_program("import os\nos.system('true')\n", RAW).passed  # guard off: the call itself is allowed


def test_applied_protections_are_recorded() -> None:
    assert APPLIED["rlimits"] is True
    assert {"landlock_abi", "netns", "pidns", "uid", "preloaded"} <= set(APPLIED)
    if os.geteuid() == 0:
        assert APPLIED["uid"] != 0  # root drops to an unprivileged uid
