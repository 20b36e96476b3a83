"""What a sandboxed program can see and reach (issue 13, finding 11), with the guard off.

Each wall needs a kernel feature; a test skips only when this kernel or these privileges really
lack it (probed here, apart from the sandbox), and fails when the feature exists but the sandbox
did not apply it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import select
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from umm.eval.sandbox import SandboxLimits, run_program

RAW = SandboxLimits(timeout_seconds=5.0, cpu_seconds=5, guard=False)
APPLIED = run_program("x = 1\n", RAW).applied

_PROC_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x00020000 | 0x20000000) != 0:  # CLONE_NEWNS | CLONE_NEWPID
    sys.exit(1)
pid = os.fork()
if pid == 0:
    ok = libc.mount(None, b"/", None, 0x4000 | 0x40000, None) == 0 and libc.mount(b"proc", b"/proc", b"proc", 14, None) == 0
    os._exit(0 if ok else 1)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def _kernel_can_remount_proc() -> bool:
    if os.geteuid() != 0:
        return False  # unprivileged: a user namespace may or may not allow it; the sandbox reports what it did
    return subprocess.run([sys.executable, "-c", _PROC_PROBE], timeout=30, check=False).returncode == 0


def _kernel_has_landlock() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)) >= 1


def _kernel_has_seccomp() -> bool:
    status = Path("/proc/self/status").read_text()
    return "Seccomp:" in status and platform.machine() in ("x86_64", "aarch64")


PROC = _kernel_can_remount_proc()
LANDLOCK = _kernel_has_landlock()
SECCOMP = _kernel_has_seccomp()


def test_the_sandbox_applies_what_the_kernel_offers() -> None:
    assert APPLIED.get("proc", False) or not PROC, APPLIED
    assert APPLIED.get("landlock_abi", 0) >= 1 or not LANDLOCK, APPLIED
    assert APPLIED.get("seccomp", False) or not SECCOMP, APPLIED


@pytest.mark.skipif(not PROC, reason="no mount + PID namespace for a fresh /proc here (needs root, or the kernel refuses)")
def test_proc_shows_only_the_sandboxs_own_processes() -> None:
    code = textwrap.dedent(
        f"""
        import os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        assert pids == [1], pids  # the program itself, PID 1 of its namespace
        assert not os.path.exists("/proc/{os.getpid()}/environ")
        print(pids)
        """
    )
    r = run_program(code, RAW)
    assert r.passed, r.stderr
    assert r.stdout.strip() == "[1]"


@pytest.mark.skipif(not (PROC and LANDLOCK), reason="needs a fresh /proc and Landlock")
def test_files_under_proc_cannot_be_read() -> None:
    for path in ("/proc/1/environ", "/proc/self/mem", "/proc/1/cmdline", "/proc/self/maps"):
        r = run_program(f"open({path!r}, 'rb').read(1)\n", RAW)
        assert not r.passed and ("Permission denied" in r.stderr or "not allow" in r.stderr), (path, r.stderr)


@pytest.mark.skipif(not SECCOMP, reason="no seccomp on this kernel/architecture")
def test_a_unix_socket_outside_the_scratch_dir_cannot_be_reached() -> None:
    where = Path(tempfile.mkdtemp(prefix="umm-sock-"))
    path = where / "coordinator.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.chmod(where, 0o777)
        server.bind(str(path))
        os.chmod(path, 0o777)  # anyone may connect: only the sandbox stands in the way
        server.listen(4)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:  # the socket does accept connections
            control.connect(str(path))
            server.accept()[0].close()
        code = f"import socket\ns = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\ns.connect({str(path)!r})\n"
        r = run_program(code, RAW)
        assert not r.passed and "Permission denied" in r.stderr, r.stderr
        ready, _, _ = select.select([server], [], [], 0.2)
        assert ready == []  # nothing waits in the backlog
        r = run_program("import socket\nsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).connect('\\0umm')\n", RAW)
        assert not r.passed  # abstract sockets too
    finally:
        server.close()
        path.unlink(missing_ok=True)
        where.rmdir()


@pytest.mark.skipif(not LANDLOCK, reason="Landlock not available on this kernel")
def test_files_outside_the_allow_list_cannot_be_read_even_where_permissions_allow() -> None:
    where = Path(tempfile.mkdtemp(prefix="umm-read-"))
    secret = where / "state.db"
    try:
        os.chmod(where, 0o755)
        secret.write_text("the coordinator's state")
        os.chmod(secret, 0o644)  # world-readable: only Landlock stands in the way
        code = textwrap.dedent(
            f"""
            import os
            results = []
            for action in (lambda: open({str(secret)!r}).read(), lambda: os.listdir({str(where)!r}),
                           lambda: open("/etc/hostname").read()):
                try:
                    action()
                    results.append("read")
                except OSError:
                    results.append("blocked")
            assert results == ["read"] * 3, results
            """
        )
        r = run_program(code, RAW)
        assert not r.passed and "['blocked', 'blocked', 'blocked']" in r.stderr, r.stderr
    finally:
        secret.unlink()
        where.rmdir()


@pytest.mark.skipif(not LANDLOCK, reason="Landlock not available on this kernel")
def test_the_allow_list_keeps_what_programs_need() -> None:
    code = textwrap.dedent(
        """
        import os, json, decimal, random
        assert open("/etc/ld.so.cache", "rb").read(4)  # the dynamic loader's cache
        open("note.txt", "w").write("scratch")
        assert open("note.txt").read() == "scratch"
        assert open("/dev/null").read() == "" and len(open("/dev/urandom", "rb").read(8)) == 8
        assert os.system("true") == 0  # system binaries and their libraries
        print(json.dumps(float(decimal.Decimal("1.5"))), random.random() < 1)
        """
    )
    r = run_program(code, RAW)
    assert r.passed, r.stderr
    assert r.stdout == "1.5 True\n"
