"""The trusted launcher of one sandboxed program (run as ``python -I -B -S _sandbox_child.py CONFIG``).

Standard library only: it runs in a fresh interpreter started by :mod:`umm.eval.sandbox` with a
scrubbed environment, in a new session (its own process group), with stdin closed. Steps:

1. read the config (program path, scratch dir, limits) and the program source;
2. unshare new network and PID namespaces (root, or a user namespace when unprivileged) where
   the kernel allows it, then fork: the child is PID 1 of the new PID namespace, so when it dies
   the kernel kills every process it started (fork bombs included, even ones that left the
   process group);
3. in the child: resource limits (CPU, address space, file size, process count, no core
   files, open files), Landlock (writes only below the scratch dir, no TCP bind/connect, no
   signals or abstract sockets outside the sandbox), pre-import of the standard-library modules
   the program names, drop to an unprivileged uid/gid when root, parent-death signal, then the
   optional reliability guard, then ``exec`` of the program;
4. the launcher waits with a wall-clock deadline, SIGKILLs the child on timeout, and writes a
   JSON status (what was applied, exit code/signal, timed out, passed) next to the config.

A program *passes* only if its code ran to the end and the harness then wrote its pass line:
``sys.exit(0)``/``os._exit(0)`` before the tests finish counts as a failure.
"""

from __future__ import annotations

import sys

# run as a script, this file's directory comes first on sys.path: drop it, so nothing in the
# package directory can shadow a standard-library module (for the launcher or the program)
if __name__ == "__main__" and sys.path and sys.path[0] == __file__.rpartition("/")[0]:
    del sys.path[0]

import ctypes  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38

# Landlock (linux/landlock.h)
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_LL_CREATE_RULESET_VERSION = 1
_LL_RULE_PATH_BENEATH = 1
_FS_WRITE_FILE = 1 << 1
_FS_REMOVE_DIR = 1 << 4
_FS_REMOVE_FILE = 1 << 5
_FS_MAKE_CHAR = 1 << 6
_FS_MAKE_DIR = 1 << 7
_FS_MAKE_REG = 1 << 8
_FS_MAKE_SOCK = 1 << 9
_FS_MAKE_FIFO = 1 << 10
_FS_MAKE_BLOCK = 1 << 11
_FS_MAKE_SYM = 1 << 12
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

# Standard-library modules never imported on a program's behalf (side effects at import).
_NO_PRELOAD = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser", "pydoc"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _landlock(write_dirs: list[str], write_files: list[str]) -> int:
    """Restrict this process: writes only below ``write_dirs`` (+ ``write_files``); no TCP; scoped.

    Returns the Landlock ABI version applied, 0 if unavailable. Needs no_new_privs set first.
    """
    abi = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LL_CREATE_RULESET_VERSION))
    if abi < 1:
        return 0
    fs = (
        _FS_WRITE_FILE | _FS_REMOVE_DIR | _FS_REMOVE_FILE | _FS_MAKE_CHAR | _FS_MAKE_DIR | _FS_MAKE_REG
        | _FS_MAKE_SOCK | _FS_MAKE_FIFO | _FS_MAKE_BLOCK | _FS_MAKE_SYM
    )
    if abi >= 2:
        fs |= _FS_REFER
    if abi >= 3:
        fs |= _FS_TRUNCATE
    net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (_SCOPE_ABSTRACT_UNIX | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    fd = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
    if fd < 0:
        return 0
    try:
        file_rights = _FS_WRITE_FILE | (_FS_TRUNCATE if abi >= 3 else 0)
        for path, rights in [(d, fs) for d in write_dirs] + [(f, file_rights) for f in write_files]:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _PathBeneath(rights, pfd)
                if _libc.syscall(_SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(_LL_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    return 0
            finally:
                os.close(pfd)
        if _libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            return 0
    finally:
        os.close(fd)
    return int(abi)


_IMPORT_RE = re.compile(r"^[ \t]*(?:from[ \t]+([A-Za-z_]\w*)[\w.]*[ \t]+import\b|import[ \t]+([^#;\n]+))", re.M)


def _imported_modules(code: str) -> list[str]:
    """Top-level names of the standard-library modules a program imports (``import``/``from`` lines)."""
    names: set[str] = set()
    for m in _IMPORT_RE.finditer(code):
        if m.group(1):
            names.add(m.group(1))
        else:
            for part in m.group(2).split(","):
                names.add(part.strip().split(" ")[0].split(".")[0])
    return sorted(n for n in names if n in sys.stdlib_module_names and n not in _NO_PRELOAD)


def _reliability_guard() -> None:
    """Disable functions that change the machine (defence in depth; the OS limits are the wall).

    ``subprocess``/``shutil`` keep their module when the program imports them (they were loaded
    before the uid drop) with the dangerous functions removed; otherwise importing them fails.
    """
    import builtins

    builtins.exit = None  # type: ignore[assignment]
    builtins.quit = None  # type: ignore[assignment]
    for name in (
        "system", "popen", "fork", "forkpty", "kill", "killpg", "putenv", "unsetenv", "remove", "unlink",
        "rmdir", "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod",
        "lchmod", "chown", "fchown", "lchown", "chroot", "fchdir", "chdir", "setuid", "setgid", "seteuid",
        "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setgroups", "link", "symlink",
        "mkfifo", "mknod", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
        "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
        "posix_spawn", "posix_spawnp", "register_at_fork",
    ):
        if hasattr(os, name):
            setattr(os, name, None)
    shutil = sys.modules.get("shutil")
    if shutil is not None:
        for name in ("rmtree", "move", "chown", "copytree"):
            setattr(shutil, name, None)
    else:
        sys.modules["shutil"] = None  # type: ignore[assignment]
    subprocess = sys.modules.get("subprocess")
    if subprocess is not None:
        subprocess.Popen = None  # type: ignore[attr-defined]
    else:
        sys.modules["subprocess"] = None  # type: ignore[assignment]
    for mod in ("ipdb", "joblib", "resource", "psutil", "tkinter", "ctypes", "_ctypes", "multiprocessing"):
        sys.modules[mod] = None  # type: ignore[assignment]


def _report_exception(exc: BaseException) -> None:
    """A short traceback on stderr (the traceback module may not be importable after the uid drop)."""
    try:
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            frames.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
            tb = tb.tb_next
        try:
            msg = str(exc)
        except BaseException:  # noqa: BLE001
            msg = "<unprintable>"
        text = "Traceback (most recent call last):\n" + "\n".join(frames[-3:]) + f"\n{type(exc).__name__}: {msg}\n"
        os.write(2, text[-4000:].encode("utf-8", "replace"))
    except BaseException:  # noqa: BLE001
        pass


def _child(cfg: dict, code: str, status_fd: int, applied: dict) -> None:
    """Apply the limits to this process, then run the program. Never returns."""
    try:
        scratch = cfg["scratch"]
        lim = cfg["limits"]
        cpu = max(1, int(lim["cpu_seconds"]))
        for res, value in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (lim["memory_bytes"], lim["memory_bytes"])),
            (resource.RLIMIT_FSIZE, (lim["file_size_bytes"], lim["file_size_bytes"])),
            (resource.RLIMIT_NPROC, (lim["max_processes"], lim["max_processes"])),
            (resource.RLIMIT_CORE, (0, 0)),
            (resource.RLIMIT_NOFILE, (lim["max_open_files"], lim["max_open_files"])),
        ):
            resource.setrlimit(res, value)
        applied["rlimits"] = True
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        applied["landlock_abi"] = _landlock([scratch], ["/dev/null"]) if cfg.get("landlock", True) else 0
        os.chdir(scratch)
        preloaded = []
        for name in _imported_modules(code):
            try:
                __import__(name)
                preloaded.append(name)
            except Exception:  # the program's own import will report it
                pass
        applied["preloaded"] = preloaded
        uid, gid = cfg.get("uid"), cfg.get("gid")
        if os.geteuid() == 0 and uid is not None:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            applied["uid"] = uid
        else:
            applied["uid"] = os.geteuid()
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        os.environ.clear()
        os.environ.update(cfg["env"])
        os.write(status_fd, (json.dumps(applied) + "\n").encode())
        if cfg.get("guard", True):
            _reliability_guard()
            applied["guard"] = True
    except BaseException as exc:  # noqa: BLE001 - set-up failed: never run the program unconfined
        os.write(2, f"sandbox set-up failed: {exc!r}\n".encode())
        os._exit(121)
    write, exit_ = os.write, os._exit
    glob = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "program.py", "exec"), glob)  # noqa: S102 - this is the sandbox
    except BaseException as exc:  # noqa: BLE001 - any exception (SystemExit too) is a failure
        try:
            sys.stdout.flush()
        except BaseException:  # noqa: BLE001
            pass
        _report_exception(exc)
        exit_(1)
    try:
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        pass
    write(status_fd, b"PASS\n")
    exit_(0)


def main(config_path: str) -> None:
    with open(config_path) as f:
        cfg = json.load(f)
    with open(cfg["program"]) as f:
        code = f.read()
    # loaded before the uid drop (the interpreter's own directory may be unreadable to that uid)
    import encodings.idna  # noqa: F401 - host names in socket calls
    import encodings.latin_1  # noqa: F401

    applied: dict = {"netns": False, "pidns": False, "userns": False}
    if cfg.get("namespaces", True):
        base = CLONE_NEWNET | CLONE_NEWPID
        if os.geteuid() == 0 and _unshare(base):
            applied.update(netns=True, pidns=True)
        elif os.geteuid() != 0 and _unshare(base | CLONE_NEWUSER):
            applied.update(netns=True, pidns=True, userns=True)
        elif _unshare(CLONE_NEWNET):
            applied.update(netns=True)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(cfg, code, w, applied)
        os._exit(122)
    os.close(w)
    deadline = time.monotonic() + float(cfg["limits"]["timeout_seconds"])
    timed_out = False
    status = None
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        poller.poll(max(1, int(left * 1000)))
        got, st = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            status = st
    os.close(pidfd)
    report = b""
    while True:
        ready, _, _ = select.select([r], [], [], 0)
        if not ready:
            break
        chunk = os.read(r, 65536)
        if not chunk or len(report) > 1 << 20:
            break
        report += chunk
    lines = report.decode("utf-8", "replace").splitlines()
    child_applied = {}
    if lines:
        try:
            child_applied = json.loads(lines[0])
        except ValueError:
            child_applied = {}
    out = {
        "applied": child_applied or applied,
        "exit_code": os.waitstatus_to_exitcode(status),
        "timed_out": timed_out,
        # the pass line is the last thing the harness writes; the program cannot skip the tests
        "passed": (not timed_out) and os.waitstatus_to_exitcode(status) == 0 and len(lines) >= 2 and lines[-1] == "PASS",
    }
    tmp = cfg["status"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, cfg["status"])


if __name__ == "__main__":
    main(sys.argv[1])
