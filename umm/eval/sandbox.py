"""Run untrusted Python programs (model completions + tests) in a sandbox, one process each.

What is enforced, and where (Linux; see ``_sandbox_child.py`` for the child's side, and the
table in ``umm/eval/README.md``):

- **verdict** (here + child): a program passes only if a judge thread in the sandbox, which the
  program cannot reach, saw it run to its own last line and wrote this run's secret token
  (``secrets.token_hex(16)``, handed over through a pipe) on the status pipe; with ``tests``, the
  tests must also be the program's last top-level statements, unchanged (:func:`ends_with_tests`,
  checked here before the run). Writing ``PASS`` anywhere and exiting early is a failure.
- **the tests' values** (here + child): with ``tests``, the parent passes how many statements
  they are; the child compiles them rewritten so their comparisons run on fresh copies of exact
  built-in types and use builtins and imported names captured before the program ran (see
  ``_harden_tests`` in ``_sandbox_child.py``): a result with a lying ``__eq__``, a shadowed ``abs``
  or a patched ``math.isclose`` does not pass.
- **process** (here): a fresh interpreter per program (``python -I -B -S``), new session
  (``start_new_session=True``), stdin closed, stdout/stderr to size-capped files, environment
  replaced by ``PATH``, ``HOME`` = ``TMPDIR`` = the scratch dir and ``LANG`` (nothing inherited),
  cwd = a fresh scratch dir removed afterwards; on a missed deadline the whole process group
  is killed with SIGKILL.
- **namespaces** (launcher): new network namespace (no interfaces up, so no network), new PID
  namespace (the program is its PID 1: when it ends, the kernel kills everything it started) and
  new mount namespace with a fresh ``/proc`` (only the sandbox's processes). Unprivileged, via a
  user namespace where the kernel allows it.
- **resource limits** (child): RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, RLIMIT_NPROC, RLIMIT_NOFILE,
  RLIMIT_CORE = 0; a wall-clock deadline enforced by the launcher (SIGKILL).
- **filesystem** (child): Landlock (kernel >= 5.13) allows reads only from the Python
  installation, ``/usr``, ``/bin``, ``/lib*``, a few ``/etc`` and ``/dev`` files and the scratch
  dir (``/proc`` may be listed, none of its files read), writes only below the scratch dir (and to
  ``/dev/null``); ABI >= 4 also blocks TCP bind/connect, ABI >= 6 blocks signals and abstract unix
  sockets to processes outside the sandbox. When running as root the child also drops to an
  unprivileged uid/gid (``nobody`` by default). Standard-library modules the program imports are
  loaded before the uid drop (the interpreter may live in a directory that uid cannot read).
- **system calls** (child): seccomp refuses ``socket(AF_UNIX, ...)`` (no unix socket anywhere),
  ``ptrace``, ``process_vm_readv``/``writev``, ``io_uring_*`` and ``pidfd_getfd`` (x86_64, aarch64).
- **reliability guard** (child, optional, on by default): destructive ``os``/``shutil``/
  ``subprocess`` functions are set to ``None``. Defence in depth only; the tests check that each
  attack is contained with the guard off.

:attr:`ExecResult.applied` records which of these took effect for each run, as the kernel
decides (e.g. no namespaces inside some containers).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_CHILD = Path(__file__).with_name("_sandbox_child.py")
#: sandboxed programs run in parallel by default (the one owner of this default: evaluation,
#: ``umm eval --workers``, the thread count the CLIs leave them, fuse's ``eval.sandbox_workers``)
DEFAULT_WORKERS = 2
_TAIL = 2000


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one program run. Defaults fit benchmark programs (HumanEval, MBPP)."""

    timeout_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 32
    max_open_files: int = 64
    guard: bool = True
    namespaces: bool = True
    landlock: bool = True
    seccomp: bool = True
    user: str | None = "nobody"  # uid to drop to when running as root (None: stay root, Landlock only)


@dataclass
class ExecResult:
    """Outcome of one program: ``passed`` is True only if it ran to the end within its limits."""

    passed: bool
    status: str  # "passed" | "failed" | "timed out" | "sandbox error"
    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    applied: dict[str, Any] = field(default_factory=dict)


def _drop_ids(user: str | None) -> tuple[int | None, int | None]:
    if user is None or os.geteuid() != 0:
        return None, None
    try:
        pw = pwd.getpwnam(user)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        return 65534, 65534


def _kill_group(pgid: int, late: bool) -> None:
    if late:
        logger.warning("sandbox launcher %d missed its deadline; killing its process group", pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def ends_with_tests(code: str, tests: str) -> bool:
    """Whether ``tests`` are, statement for statement, the last top-level statements of ``code``.

    Code placed before the tests cannot swallow them (an open string, a line continuation, a
    block): the program's syntax tree must end with the tests' own. True when the tests do not
    parse on their own (nothing to compare); False when the program does not parse.
    """
    try:
        own = ast.parse(tests).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True
    try:
        body = ast.parse(code).body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    n = len(own)
    return n <= len(body) and all(ast.dump(a) == ast.dump(b) for a, b in zip(body[len(body) - n:], own))


def _count_statements(tests: str | None) -> int:
    """How many top-level statements ``tests`` has (0: none, or they do not parse on their own)."""
    try:
        return len(ast.parse(tests).body) if tests is not None else 0
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0


def run_program(code: str, limits: SandboxLimits | None = None, tests: str | None = None) -> ExecResult:
    """Run ``code`` (a complete Python program) in the sandbox and report how it ended.

    It passes only if it ran to its last line (see ``_sandbox_child.py``); with ``tests`` (the
    text the program ends with), also only if those are intact (:func:`ends_with_tests`), which is
    checked here before anything runs. Never raises for anything the program does; an error of
    the sandbox itself (launcher crashed) is reported as ``status="sandbox error"`` and counts
    as not passed.
    """
    lim = limits or SandboxLimits()
    t0 = time.monotonic()
    if tests is not None and not ends_with_tests(code, tests):
        return ExecResult(False, "failed", None, "", "the program's tests are not intact: code before them changed them\n")
    root = Path(tempfile.mkdtemp(prefix="umm-sbx-"))
    try:
        os.chmod(root, 0o711)
        scratch = root / "scratch"
        scratch.mkdir(mode=0o700)
        uid, gid = _drop_ids(lim.user)
        if uid is not None:
            os.chown(scratch, uid, gid)
        program = root / "program.py"
        program.write_text(code, encoding="utf-8")
        cfg = {
            "program": str(program),
            "scratch": str(scratch),
            "status": str(root / "status.json"),
            "uid": uid,
            "gid": gid,
            "guard": lim.guard,
            "namespaces": lim.namespaces,
            "landlock": lim.landlock,
            "seccomp": lim.seccomp,
            "tests": _count_statements(tests),  # the last statements: compiled with plain-value checks
            "env": {"PATH": "/usr/bin:/bin", "HOME": str(scratch), "TMPDIR": str(scratch), "LANG": "C.UTF-8"},
            "limits": {
                "timeout_seconds": lim.timeout_seconds,
                "cpu_seconds": lim.cpu_seconds,
                "memory_bytes": lim.memory_bytes,
                "file_size_bytes": lim.file_size_bytes,
                "max_processes": lim.max_processes,
                "max_open_files": lim.max_open_files,
            },
        }
        token = secrets.token_hex(16)  # the run's secret: in no file, argument or environment
        token_r, token_w = os.pipe()
        try:
            os.write(token_w, token.encode())
        finally:
            os.close(token_w)
        cfg["token_fd"] = token_r
        (root / "config.json").write_text(json.dumps(cfg))
        with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-S", str(_CHILD), str(root / "config.json")],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=scratch,
                    env=cfg["env"],
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(token_r,),
                )
            finally:
                os.close(token_r)
            # the launcher enforces the program's deadline itself; this watchdog only catches a
            # launcher that misses it (a blocking wait: Popen.wait(timeout) polls with sleeps)
            watchdog = threading.Timer(lim.timeout_seconds + 10.0, _kill_group, (proc.pid, True))
            watchdog.daemon = True
            watchdog.start()
            try:
                proc.wait()
            finally:
                watchdog.cancel()
                _kill_group(proc.pid, False)
        stdout, stderr = _tail(root / "stdout"), _tail(root / "stderr")
        try:
            st = json.loads((root / "status.json").read_text())
        except (OSError, ValueError):
            return ExecResult(False, "sandbox error", proc.returncode, stdout, stderr, time.monotonic() - t0)
        # the verdict: the token, which only the judge thread in the sandbox knows, and which it
        # writes only after the program's last line ran (see _sandbox_child.py)
        passed = not st["timed_out"] and f"PASS {token}" in st["report"]
        status = "passed" if passed else "timed out" if st["timed_out"] else "failed"
        return ExecResult(passed, status, st["exit_code"], stdout, stderr, time.monotonic() - t0, st["applied"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_programs(
    programs: Sequence[str],
    limits: SandboxLimits | None = None,
    workers: int = DEFAULT_WORKERS,
    on_done: Callable[[int, ExecResult], None] | None = None,
    tests: Sequence[str | None] | None = None,
) -> list[ExecResult]:
    """Run many programs, ``workers`` at a time (each in its own sandbox); results in input order.

    ``tests[i]``, when given, is the text program ``i`` ends with (see :func:`run_program`)."""
    if not programs:
        return []
    results: list[ExecResult | None] = [None] * len(programs)
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="umm-sandbox") as pool:
        futures = {
            pool.submit(run_program, code, limits, tests[i] if tests is not None else None): i
            for i, code in enumerate(programs)
        }
        from concurrent.futures import as_completed

        for fut in as_completed(futures):
            i = futures[fut]
            results[i] = fut.result()
            if on_done is not None:
                on_done(i, results[i])  # type: ignore[arg-type]
    return [r for r in results if r is not None]
