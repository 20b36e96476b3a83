"""Speed tricks, in one place behind one switch: ``UMM_SPEEDUPS=0`` turns every one off.

Each trick changes how fast a command runs, never what it computes or writes, and each is
process-wide, so only command-line entry points call them (never the library, tests or a
notebook). The figures in the comments were measured on a shared 2-core machine (load 2-7),
in child processes, CPU-seconds (user + system) being the steadier figure; ``UMM_SPEEDUPS=0
python bench/bench_merge.py`` gives the whole-command effect. With the switch off each function falls
back to the plain behaviour, which is what to try first when a trick is suspected.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import gc
import importlib
import os
import sys
import threading
from typing import NoReturn

#: Environment variable; ``0`` disables every trick below.
SWITCH = "UMM_SPEEDUPS"


def enabled() -> bool:
    """Whether the tricks are on (read on every call, so a test or a user may flip it)."""
    return os.environ.get(SWITCH, "1").strip() != "0"


def tune_allocator() -> bool:
    """Make glibc keep freed blocks of up to 32 MiB for reuse instead of returning them to the OS.

    A merge allocates and frees the same few buffer sizes thousands of times; with glibc's
    defaults each large buffer is a fresh ``mmap`` whose pages fault in (and are zeroed) again.
    Returns whether the settings were applied (False when switched off or off glibc).
    """
    # Saves (bench_merge's linear recipe, 220M bf16 x 3, 5 runs each): system CPU 0.77 -> 0.48 s,
    # 2.30 -> 1.96 CPU-s in all (-15%); on its TIES recipe within noise (11.6 vs 11.4 CPU-s).
    if not enabled():
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1
        ok &= libc.mallopt(m_trim_threshold, 256 * 2**20) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def import_frozen(*modules: str) -> None:
    """Import ``modules`` without cyclic-GC passes, then ``gc.freeze()`` what the imports made.

    Importing torch creates about a million objects that live until exit; the collector's
    passes over them during the import and again at interpreter shutdown cost about as much CPU
    as a small merge. ``gc.freeze`` moves them out of its sight (the pattern the ``gc`` docs give
    for long-lived start-up objects). A plain import when switched off, or when this process
    has imported torch already (its heap is then not this command's alone: a test, a notebook).
    """
    # Saves (importing the merge modules in a fresh process, 7 runs each): 1.23 -> 1.11 CPU-s
    # median (-0.12 CPU-s): the collector's passes during the import (more at exit without fast_exit).
    if not enabled() or "torch" in sys.modules:
        for m in modules:
            importlib.import_module(m)
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for m in modules:
            importlib.import_module(m)
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()



def freeze_for_exit() -> None:
    """``gc.freeze()`` once a long-running command's own clean-up is done, so that the interpreter
    ends without the cyclic collector's passes over every object.

    For the node's and the coordinator's commands, which end through the interpreter's teardown
    (not :func:`fast_exit`: their DHT and gRPC threads must stop first). The objects it freezes
    are only ever collected at exit. Nothing when switched off.
    """
    # Saves (a stopped node or coordinator, torch, transformers, hivemind and grpc imported): the
    # collector's passes during module teardown took 2.6-3.6 s under a load average of ~12 on 2
    # cores, 0.56 s after gc.freeze; their cost grows with the load, so a stopped node took seconds
    # to tens of seconds more to end (bench/bench_shutdown.py measures the exits).
    if enabled():
        gc.freeze()


def _exit_status(code: int | str | None) -> int:
    """The status ``sys.exit(code)`` would give; a message is printed to stderr as it would."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    sys.stderr.write(f"{code}\n")  # sys.exit("message") prints the message and exits with 1
    return 1


def fast_exit(code: int | str | None) -> NoReturn:
    """End the process as ``sys.exit(code)`` would, without tearing down the interpreter.

    Everything a program may rely on at exit still happens: ``atexit`` handlers run (logging's
    flush, multiprocessing's and temporary folders' clean-up) and stdout/stderr are flushed.
    ``sys.exit`` when switched off, or while a non-daemon thread runs (Python would wait for
    it). Not for use inside a process that goes on running code (tests, notebooks).
    """
    # Saves (a process that imported the merge modules, 7 runs each): 1.65 -> 1.25 CPU-s median
    # (-0.4 CPU-s, 1.78 -> 1.25 s wall): the interpreter's teardown of torch's modules.
    main_thread = threading.main_thread()
    if not enabled() or any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(code)
    status = _exit_status(code)
    try:
        atexit._run_exitfuncs()  # private, but the only way to run them without the teardown
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status & 0xFF)
