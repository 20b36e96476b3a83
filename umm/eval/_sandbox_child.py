"""The trusted launcher of one sandboxed program (run as ``python -I -B -S _sandbox_child.py CONFIG``).

Standard library only: it runs in a fresh interpreter started by :mod:`umm.eval.sandbox` with a
scrubbed environment, in a new session (its own process group), with stdin closed. Steps:

1. read the config (program path, scratch dir, limits) and the run's secret token (from a pipe
   the parent wrote and closed; it is never in a file, the environment or the command line);
2. unshare new network, PID and mount namespaces (root, or a user namespace when unprivileged)
   where the kernel allows it, then fork: the child is PID 1 of the new PID namespace, so when it
   dies the kernel kills every process it started (fork bombs included);
3. in the child: resource limits, a fresh ``/proc`` (only the sandbox's processes), Landlock
   (reads only from the Python installation, system libraries and the scratch dir; writes only
   below the scratch dir; no TCP; no signals or abstract sockets outside the sandbox), the
   standard-library modules the program names imported, the drop to an unprivileged uid/gid,
   seccomp (no unix sockets, no ptrace/process_vm_*, no io_uring), an audit hook (below), the
   optional reliability guard;
4. the judge's thread starts with the token (read from the pipe in a helper frame that is gone
   before the program runs), then the audit hook is installed and the program runs on the main
   thread;
5. the launcher waits with a wall-clock deadline, SIGKILLs the child on timeout, and writes a
   JSON status (what was applied, exit code/signal, timed out, the lines written on the status
   pipe) next to the config; the parent looks there for ``PASS <token>``.

The verdict (the threat model is in ``umm/eval/README.md``): the program is compiled with a last
line of its own that calls an end marker; the marker hands its caller's frame to the judge, which
writes ``PASS <token>`` only if that is a real frame of *this* program's code object, with *its*
globals, standing on that last line: the module ran to its end, so every statement before it (all
the tests) ran without an uncaught exception. The program never holds the token: it lives only in
the judge thread's frame, and the audit hook denies every way to another thread's frames, to raw
memory, or to code on the judge's thread: ``sys._current_frames``, ``gc.get_objects``/
``get_referrers``/``get_referents``, ``tb_frame``/``gi_frame``/``cr_frame``/``ag_frame``,
``sys._getframe`` on the judge's thread (a finalizer may run there), ``sys.addaudithook``, ctypes,
``code.__new__``/``marshal.loads`` (forged bytecode reads memory), ``sys.settrace``/
``sys.setprofile`` (line jumps over asserts), sub-interpreters (no hook there); Landlock makes
``/proc/self/mem`` unreadable. Python signal handlers only ever run on the main thread (the
program's). Writing ``PASS`` to every descriptor, ``os._exit(0)``, ``sys.exit(0)``, a fork,
threads, atexit or signals do not produce the token.

The tests' last statements (as many as the config's ``tests``) are compiled rewritten, so that what
their comparisons mean does not depend on the program's objects or names (``_harden_tests``).
"""

from __future__ import annotations

import sys

# run as a script, this file's directory comes first on sys.path: drop it, so nothing in the
# package directory can shadow a standard-library module (for the launcher or the program)
if __name__ == "__main__" and sys.path and sys.path[0] == __file__.rpartition("/")[0]:
    del sys.path[0]

import ast
import builtins
import collections
import ctypes
import itertools
import json
import os
import re
import resource
import select
import signal
import struct
import time
import types
import warnings

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 0x40000

# Landlock (linux/landlock.h)
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_LL_CREATE_RULESET_VERSION = 1
_LL_RULE_PATH_BENEATH = 1
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
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
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE  # the rights a file rule may hold

# Read-only (read, list, execute) for the program: system binaries and libraries (``os.system``,
# extension modules' shared libraries) and the Python installation, added at run time.
_READ_ONLY = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
              "/etc/localtime", "/dev/urandom", "/dev/random", "/dev/zero")

# seccomp: (audit arch, socket, denied syscalls: ptrace, process_vm_readv/writev, io_uring_*, pidfd_getfd)
_SECCOMP_ARCH = {
    "x86_64": (0xC000003E, 41, (101, 310, 311, 425, 426, 427, 438)),
    "aarch64": (0xC00000B7, 198, (117, 270, 271, 425, 426, 427, 438)),
}
_AF_UNIX = 1
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_EACCES = 0x00050000 | 13

# Standard-library modules never imported on a program's behalf (side effects at import).
_NO_PRELOAD = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser", "pydoc"}

# Audit events the program may not raise in any thread: they reach other threads' frames or raw
# memory (where the token is), or change how the tests execute.
_DENIED_EVENTS = frozenset({
    "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents", "code.__new__", "marshal.loads", "marshal.load",
    "cpython.PyInterpreterState_New",
})
_FRAME_ATTRS = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})

# The program's last line: the end marker (see the module docstring).
_END_NAME = "__umm_sandbox_end__"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _unshare(flags: int) -> bool:
    return _libc.unshare(ctypes.c_int(flags)) == 0


def _mount_proc() -> bool:
    """A private mount namespace view with a fresh ``/proc`` of this PID namespace (root only)."""
    if _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return False
    return _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) == 0


def _landlock(full_dirs: list[str], write_files: list[str], read_only: list[str], list_only: list[str]) -> int:
    """Restrict this process: reads only below ``read_only`` (+ ``full_dirs``), writes only below
    ``full_dirs`` (+ ``write_files``), ``list_only`` may be listed but no file below it read; no
    TCP; no signals or abstract unix sockets outside the sandbox.

    Returns the Landlock ABI version applied, 0 if unavailable. Needs no_new_privs set first.
    """
    abi = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(_LL_CREATE_RULESET_VERSION))
    if abi < 1:
        return 0
    fs = (
        _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_READ_DIR | _FS_REMOVE_DIR | _FS_REMOVE_FILE
        | _FS_MAKE_CHAR | _FS_MAKE_DIR | _FS_MAKE_REG | _FS_MAKE_SOCK | _FS_MAKE_FIFO | _FS_MAKE_BLOCK | _FS_MAKE_SYM
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
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    rules = ([(d, fs) for d in full_dirs] + [(f, _FS_READ_FILE | _FS_WRITE_FILE | _FS_TRUNCATE) for f in write_files]
             + [(r, read) for r in read_only] + [(d, _FS_READ_DIR) for d in list_only])
    try:
        for path, rights in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this system: nothing to allow
            try:
                if not os.path.isdir(path):
                    rights &= _FILE_RIGHTS
                rule = _PathBeneath(rights & fs, pfd)
                if _libc.syscall(_SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(_LL_RULE_PATH_BENEATH), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    return 0
            finally:
                os.close(pfd)
        if _libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
            return 0
    finally:
        os.close(fd)
    return int(abi)


def _seccomp_filter(arch: int, socket_nr: int, denied: tuple[int, ...]) -> bytes:
    """A classic-BPF seccomp program: EACCES for ``socket(AF_UNIX, ...)``, for every syscall in
    ``denied`` and for another architecture's (or x32) calls; everything else is allowed."""
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    n = len(denied)
    deny = 9 + n  # index of the final "ret EACCES"; a jump's offset counts from the next instruction
    prog = [(ld, 0, 0, 4), (jeq, 0, deny - 2, arch), (ld, 0, 0, 0), (jge, deny - 4, 0, 0x40000000)]
    prog += [(jeq, deny - (4 + i) - 1, 0, nr) for i, nr in enumerate(denied)]
    prog += [(jeq, 1, 0, socket_nr), (ret, 0, 0, _SECCOMP_RET_ALLOW)]
    prog += [(ld, 0, 0, 16), (jeq, 1, 0, _AF_UNIX), (ret, 0, 0, _SECCOMP_RET_ALLOW), (ret, 0, 0, _SECCOMP_RET_EACCES)]
    return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _seccomp() -> bool:
    """Install :func:`_seccomp_filter` for this machine's architecture (no_new_privs set first)."""
    spec = _SECCOMP_ARCH.get(os.uname().machine)
    if spec is None:
        return False
    code = _seccomp_filter(*spec)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return _libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(prog), 0, 0) == 0


def _python_dirs() -> list[str]:
    """The Python installation the program may read (standard library, extension modules)."""
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    dirs |= {os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)}
    return sorted(dirs)


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


# ---- the tests' values: plain data, compared by the tests' own code with trusted names
#
# The tests' statements are compiled with three changes (``_harden_tests``), so that what their
# comparisons mean does not depend on objects or names the program controls:
# 1. every call of a function that is not the tests' own (``candidate(x)``, ``f(1)``, a method)
#    becomes ``PLAIN(call)``: the result is copied into fresh objects of exact built-in types
#    (int, float, complex, str, bytes, bool, None, list, tuple, set, frozenset, dict) and anything
#    else (an int subclass, an object with its own ``__eq__``) raises TypeError, which fails the
#    run; ``==``/``<``/``abs`` then run on built-in types only, whose methods cannot be changed;
# 2. a program name passed as a value (``check(entry_point)``) becomes ``GUARD(name)``: a function
#    is wrapped so that each of its results goes through ``PLAIN``, anything else is ``PLAIN``'d;
# 3. builtins (``abs``, ``isinstance``, ``len`` ...) and the names the tests import (``math``,
#    ``math.isclose``, ``from random import randint``) are the objects captured before the program
#    ran, loaded as constants (a placeholder string, swapped in the compiled code's constants), so
#    no global, builtins entry or module attribute the program rebinds is consulted.
# The one exception to 3: in a top-level ``assert NAME(<literals>) == ...`` the NAME is the function
# under test (the program's, even if it is called like a builtin); its result goes through PLAIN.
#
# The checking functions use no globals, closures or defaults: every reference they use is in the
# tuple bound to them with ``types.MethodType`` (immutable); the audit hook refuses to replace their
# ``__code__``. Copies are built inside C calls, so no frame local ever holds one half-built.

def _plain_impl(c, value):
    """A fresh copy of ``value`` made only of exact built-in types; TypeError for any other type.

    ``c``: (this function, type, int, float, complex, str, bytes, bool, NoneType, list, tuple, set,
    frozenset, dict, dict.items, Counter, OrderedDict, defaultdict, map, itertools.repeat, TypeError).
    A Counter/OrderedDict/defaultdict is read through ``dict.items`` and copied into a dict.
    """
    t = c[1](value)
    if t is c[2] or t is c[3] or t is c[4] or t is c[5] or t is c[6] or t is c[7] or t is c[8]:
        return value
    if t is c[9] or t is c[10] or t is c[11] or t is c[12]:
        return t(c[18](c[0], c[19](c), value))
    if t is c[13] or t is c[15] or t is c[16] or t is c[17]:
        return c[13](c[18](c[0], c[19](c), c[14](value)))
    raise c[20]("the tests compare only values of plain built-in types (int, float, str, list, tuple, dict, set, ...)")


def _call_impl(c, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, its result through :func:`_plain_impl` (``c``: its tuple)."""
    return c[0](c, fn(*args, **kwargs))


def _guard_impl(g, value):
    """A callable wrapped so its results are plain data; any other value made plain.

    ``g``: (callable, types.MethodType, the bound call checker, the bound plain copier)."""
    if g[0](value):
        return g[1](g[2], value)
    return g[3](value)


_TRUSTED_FUNCTIONS = (_plain_impl, _call_impl, _guard_impl)


def _checkers() -> tuple:
    """(PLAIN, GUARD): the bound checking functions, from references captured now."""
    c = (_plain_impl, type, int, float, complex, str, bytes, bool, type(None), list, tuple, set, frozenset,
         dict, dict.items, collections.Counter, collections.OrderedDict, collections.defaultdict, map,
         itertools.repeat, TypeError)
    plain = types.MethodType(_plain_impl, c)
    call = types.MethodType(_call_impl, c)
    return plain, types.MethodType(_guard_impl, (callable, types.MethodType, call, plain))


def _bound_names(stmts: list) -> tuple[set, set, dict]:
    """Names the tests bind: (all of them, those bound by def/class, those bound by imports only,
    mapped to the imported object, resolved now)."""
    bound: set = set()
    defs: set = set()
    imported: dict = {}
    for node in (n for s in stmts for n in ast.walk(s)):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defs.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.partition(".")[0]
                module = sys.modules.get(a.name if a.asname else top)
                imported[a.asname or top] = module
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            module = sys.modules.get(node.module)
            for a in node.names:
                imported[a.asname or a.name] = getattr(module, a.name, None) if module is not None else None
    imported = {k: v for k, v in imported.items() if v is not None and k not in bound and k not in defs}
    return bound | defs, defs, imported


def _is_literal(node) -> bool:
    """A literal built from constants only (no name lookup when it runs)."""
    if isinstance(node, ast.Constant):
        return True
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return all(_is_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return all(k is not None and _is_literal(k) for k in node.keys) and all(_is_literal(v) for v in node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return isinstance(node.operand, ast.Constant)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        return all(isinstance(x, ast.Constant) or _is_literal(x) and isinstance(x, ast.UnaryOp) for x in (node.left, node.right))
    return False


def _functions_under_test(stmts: list) -> set:
    """ids of the NAME nodes of top-level ``assert NAME(<literals>) <op> ...`` (the program's function)."""
    out = set()
    for s in stmts:
        if isinstance(s, ast.Assert) and isinstance(s.test, ast.Compare):
            for side in (s.test.left, *s.test.comparators):
                if (isinstance(side, ast.Call) and isinstance(side.func, ast.Name)
                        and all(_is_literal(a) for a in side.args) and all(_is_literal(k.value) for k in side.keywords)):
                    out.add(id(side.func))
    return out


class _Harden(ast.NodeTransformer):
    """Rewrites the tests' expressions (see the comment above :func:`_plain_impl`)."""

    def __init__(self, trusted: list, prefix: str, stmts: list) -> None:
        self.trusted, self.prefix = trusted, prefix
        self.bound, self.defs, imported = _bound_names(stmts)
        self.names = {k: v for k, v in vars(builtins).items() if k not in self.bound and not k.startswith("_")}
        self.names.update(imported)
        self.under_test = _functions_under_test(stmts)
        self.plain, self.guard = _checkers()
        self.parents: dict = {}
        self.originals = [n for s in stmts for n in ast.walk(s)]  # alive, so no new node reuses an id
        for s in stmts:
            for node in ast.walk(s):
                for child in ast.iter_child_nodes(node):
                    self.parents[id(child)] = node

    def const(self, obj, like):
        self.trusted.append(obj)
        return ast.copy_location(ast.Constant(f"{self.prefix}{len(self.trusted) - 1}"), like)

    def wrap(self, checker, node):
        return ast.copy_location(ast.Call(self.const(checker, node), [node], []), node)

    def resolve(self, node):
        """The trusted object a Name/Attribute chain stands for, or None."""
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in self.under_test:
            return self.names.get(node.id)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            base = self.resolve(node.value)
            return getattr(base, node.attr, None) if base is not None else None
        return None

    def folded(self, node) -> bool:
        # an operand of a constant-folded operation: a placeholder there would be folded away
        return isinstance(self.parents.get(id(node)), (ast.BinOp, ast.UnaryOp, ast.Subscript))

    def visit_Name(self, node):
        obj = self.resolve(node)
        if obj is not None and not self.folded(node):
            return self.const(obj, node)
        if isinstance(node.ctx, ast.Load) and node.id not in self.bound and node.id not in self.names:
            return self.wrap(self.guard, node)  # a program name used as a value
        return node

    def visit_Attribute(self, node):
        obj = self.resolve(node)
        if obj is not None and not self.folded(node):
            return self.const(obj, node)
        return self.generic_visit(node)

    def visit_Call(self, node, receiver: bool = False):
        """A call; its result checked unless it is the tests' own function, a trusted one, or the
        receiver of a method call (``Solution().f(1)``: the method's result is checked)."""
        func = node.func
        own = isinstance(func, ast.Name) and func.id in self.defs
        program = isinstance(func, ast.Name) and (id(func) in self.under_test or not own and self.resolve(func) is None)
        if program or isinstance(func, ast.Attribute) and self.resolve(func) is None:
            if isinstance(func, ast.Attribute):  # a method: its receiver may be any object of the program's
                recv = func.value
                if isinstance(recv, ast.Call):
                    func.value = self.visit_Call(recv, receiver=True)
                elif not (isinstance(recv, ast.Name) and recv.id not in self.bound and recv.id not in self.names):
                    func.value = self.visit(recv)
            node.args = [self.visit(a) for a in node.args]
            node.keywords = [self.visit(k) for k in node.keywords]
        else:
            node = self.generic_visit(node)
        trusted = isinstance(node.func, ast.Constant) and id(func) not in self.under_test
        return node if own or trusted or receiver else self.wrap(self.plain, node)


def _harden_tests(stmts: list, trusted: list, prefix: str) -> None:
    """Rewrite the tests' statements in place (``trusted``: the objects of the placeholders)."""
    harden = _Harden(trusted, prefix, stmts)
    for i, s in enumerate(stmts):
        stmts[i] = ast.fix_missing_locations(harden.visit(s))


def _substitute(code, prefix: str, objects: list):
    """``code`` with each placeholder constant (also inside constant tuples/frozensets and nested
    code objects) replaced by its trusted object."""
    if not objects:
        return code

    def sub(c):
        if type(c) is str and c.startswith(prefix):
            return objects[int(c[len(prefix):])]
        if type(c) is tuple:
            return tuple(sub(x) for x in c)
        if type(c) is frozenset:
            return frozenset(sub(x) for x in c)
        if type(c) is types.CodeType:
            return _substitute(c, prefix, objects)
        return c

    return code.replace(co_consts=tuple(sub(c) for c in code.co_consts))



def _report_exception(exc: BaseException) -> None:
    """A short report on stderr: the exception and the program's line numbers (frames are off limits)."""
    try:
        lines = []
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None  # past the harness's frame
        while tb is not None:
            lines.append(f"  line {tb.tb_lineno}")
            tb = tb.tb_next
        try:
            msg = str(exc)
        except BaseException:
            msg = "<unprintable>"
        text = "Traceback (most recent call last):\n" + "\n".join(lines[-3:]) + f"\n{type(exc).__name__}: {msg}\n"
        os.write(2, text[-4000:].encode("utf-8", "replace"))
    except BaseException:
        pass


def _flush_stdout() -> None:
    try:
        sys.stdout.flush()
    except BaseException:
        pass


def _audit_hook(judge_ident: int, get_ident, trusted: tuple):
    """The hook that keeps the program away from the token and the tests' control flow.

    Installed before the program runs; CPython offers no way to remove or list it, and it denies
    adding another. It holds no reference the program could use, and nothing stores it. It also
    refuses to replace the code or defaults of the ``trusted`` functions (the tests' value checks).
    """
    denied, frame_attrs = _DENIED_EVENTS, _FRAME_ATTRS

    def hook(event: str, args: tuple) -> None:
        if event in denied or event.startswith("ctypes."):
            raise RuntimeError(f"the sandbox does not allow {event}")
        if event == "object.__setattr__" and any(args[0] is f for f in trusted):
            raise RuntimeError("the sandbox does not allow changing its value checks")
        if event == "object.__getattr__" and args[1] in frame_attrs:
            raise RuntimeError(f"the sandbox does not allow reading {args[1]}")
        if event == "sys._getframe" and get_ident() == judge_ident:
            raise RuntimeError("the sandbox does not allow frames of the judge's thread")
        if event == "open" and isinstance(args[0], str) and (args[0] == "/proc" or args[0].startswith("/proc/")):
            raise RuntimeError("the sandbox does not allow files under /proc")  # Landlock's job; this without it

    return hook


def _end_marker(slot: list, getframe):
    """The function the program's last line calls: it hands its caller's frame to the judge."""

    def end() -> None:
        slot.append(getframe(1))

    return end


def _run(program, glob: dict, done, report, flush) -> None:
    """Run the program (on the main thread), report an exception, then wake the judge (in every case)."""
    try:
        exec(program, glob)
    except BaseException as exc:
        report(exc)
    finally:
        try:
            flush()
        finally:
            done.release()


def _judge(done, slot: list, glob: dict, program, last_line: int, line: bytes, status_fd: int,
           frame_type: type, type_, write, exit_) -> None:
    """The judge's thread: once woken, write ``line`` (``PASS <token>``) only if the end marker
    handed over a real frame of ``program`` with ``glob``, standing on its last line; then end
    the process. Every name it uses is an argument, bound before the program could replace one.
    """
    done.acquire()
    f = slot[0] if slot else None
    if type_(f) is frame_type and f.f_globals is glob and f.f_lineno == last_line and f.f_code is program:
        write(status_fd, line)
        exit_(0)
    exit_(1)


def _start_judge(token_fd: int, program, last_line: int, status_fd: int) -> tuple:
    """Start the judge's thread with the token (read here, so no frame of the main thread keeps it).

    Returns (the judge's thread id, the lock that wakes it, the program's globals).
    """
    import _thread

    line = b"PASS " + os.read(token_fd, 256).strip() + b"\n"
    os.close(token_fd)
    done = _thread.allocate_lock()
    done.acquire()
    slot: list = []
    glob = {"__name__": "__main__", "__builtins__": __builtins__, _END_NAME: _end_marker(slot, sys._getframe)}
    ident = _thread.start_new_thread(
        _judge, (done, slot, glob, program, last_line, line, status_fd, type(sys._getframe()), type, os.write, os._exit)
    )
    return ident, done, glob


def _compile_program(code: str, n_tests: int = 0):
    """The program with its end-marker line appended, and that line's number; None if it does not
    compile. Its last ``n_tests`` top-level statements (the tests) are compiled hardened
    (:func:`_harden_tests`)."""
    try:
        tree = ast.parse(code + "\n" + _END_NAME + "()\n", "program.py")
        trusted: list = []
        prefix = f"\x00umm-trusted-{os.urandom(8).hex()}-"
        if n_tests > 0:
            _harden_tests(tree.body[max(0, len(tree.body) - 1 - n_tests):-1], trusted, prefix)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a trusted object called through its placeholder string
            program = compile(tree, "program.py", "exec", dont_inherit=True)
        program = _substitute(program, prefix, trusted)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as exc:
        _report_exception(exc)
        return None, 0
    return program, max(line for _, _, line in program.co_lines() if line is not None)


def _child(cfg: dict, code: str, status_fd: int, applied: dict) -> None:
    """Apply the limits to this process, then run the program and judge it. Never returns."""
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
        applied["proc"] = bool(applied.get("mntns")) and _mount_proc()
        _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        applied["landlock_abi"] = (
            _landlock([scratch], ["/dev/null"], list(_READ_ONLY) + _python_dirs(), ["/proc"] if applied["proc"] else [])
            if cfg.get("landlock", True) else 0
        )
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
        applied["seccomp"] = _seccomp() if cfg.get("seccomp", True) else False
        os.environ.clear()
        os.environ.update(cfg["env"])
        os.write(status_fd, (json.dumps(applied) + "\n").encode())
        program, last_line = _compile_program(code, int(cfg.get("tests") or 0))
        if program is None:
            os._exit(1)
        import _thread

        judge, done, glob = _start_judge(cfg["token_fd"], program, last_line, status_fd)
        sys.addaudithook(_audit_hook(judge, _thread.get_ident, _TRUSTED_FUNCTIONS))
        if cfg.get("guard", True):
            _reliability_guard()
    except BaseException as exc:
        os.write(2, f"sandbox set-up failed: {exc!r}\n".encode())
        os._exit(121)
    _run(program, glob, done, _report_exception, _flush_stdout)
    while True:  # the judge ends the process
        _thread.allocate_lock().acquire(True, 1.0)


def _namespaces() -> dict:
    """Unshare the network, PID and mount namespaces (in a user namespace when unprivileged),
    falling back to fewer where the kernel refuses; returns which took effect."""
    user = CLONE_NEWUSER if os.geteuid() != 0 else 0
    for flags in (user | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS, user | CLONE_NEWNET | CLONE_NEWPID, CLONE_NEWNET):
        if _unshare(flags):
            return {"netns": True, "pidns": bool(flags & CLONE_NEWPID), "mntns": bool(flags & CLONE_NEWNS),
                    "userns": bool(flags & CLONE_NEWUSER)}
    return {"netns": False, "pidns": False, "mntns": False, "userns": False}


def main(config_path: str) -> None:
    with open(config_path) as f:
        cfg = json.load(f)
    with open(cfg["program"]) as f:
        code = f.read()
    # loaded before the uid drop (the interpreter's own directory may be unreadable to that uid)
    import encodings.idna
    import encodings.latin_1  # noqa: F401

    applied = _namespaces() if cfg.get("namespaces", True) else {}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(cfg, code, w, applied)
        os._exit(122)
    os.close(w)
    os.close(cfg["token_fd"])  # only the child's judge reads it
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
        "report": lines[1:64],  # the parent looks for the judge's "PASS <token>" here
    }
    tmp = cfg["status"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, cfg["status"])


if __name__ == "__main__":
    main(sys.argv[1])
