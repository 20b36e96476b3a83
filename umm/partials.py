"""Hidden work folders that name the process writing them, so a later run can reclaim a dead one's.

A long command writes its output into a sibling folder ``<prefix><pid>-<start>-<random>`` and
renames it into place when done; an exception or Ctrl-C (and, in the ``umm`` command, SIGTERM)
removes it. A process killed outright (SIGKILL, out of memory, power loss) cannot, so the next
run that writes beside it calls :func:`remove_stale_partials`, which removes exactly the folders
whose owner is gone:

- ``pid`` is the owner's process id and ``start`` its start time in centiseconds, so a reused pid
  is told apart from the owner: the folder is stale when no process has that pid, when it is a
  zombie, or when it started at another time. On Linux ``start`` counts from boot (the kernel's
  ``starttime`` in ``/proc/<pid>/stat``): a wall-clock start time (``psutil``'s ``create_time``,
  used elsewhere) moves when the clock is stepped, and a live owner's folder could then look stale;
- a folder whose owner still runs is never touched, nor any name that does not parse (older
  layouts, other programs' files): those are left to the user.

Processes are judged on this machine only: folders on a filesystem shared with other machines
(or other pid namespaces) that write to the same parent would be judged by local pids.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import secrets
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

#: slack when comparing start times (rounding of clock ticks to centiseconds)
_START_SLACK_CS = 2


def process_start_cs(pid: int) -> int:
    """Start time of process ``pid`` in centiseconds: since boot on Linux (``/proc/<pid>/stat``'s
    ``starttime`` ticks), else since the epoch (psutil); ``psutil.NoSuchProcess`` if it is gone."""
    import psutil

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():  # Linux, and no such process
            raise psutil.NoSuchProcess(pid) from None
        return round(psutil.Process(pid).create_time() * 100)
    except OSError:
        return round(psutil.Process(pid).create_time() * 100)
    ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the name in (...) may hold spaces
    return round(ticks * 100 / os.sysconf("SC_CLK_TCK"))


@functools.cache
def _own_start_cs(pid: int) -> int:
    return process_start_cs(pid)


def partial_path(parent: str | os.PathLike[str], prefix: str) -> Path:
    """A fresh name ``parent / f"{prefix}{pid}-{start}-{random}"`` owned by this process (not created)."""
    pid = os.getpid()  # read each time: a forked child owns its own folders
    return Path(parent) / f"{prefix}{pid}-{_own_start_cs(pid)}-{secrets.token_hex(4)}"


def owner_alive(pid: int, start_cs: int) -> bool:
    """Whether the process that started at ``start_cs`` with id ``pid`` still runs (not a zombie).

    A process we may not inspect counts as alive: nothing of a live process is ever removed.
    """
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(process_start_cs(pid) - start_cs) <= _START_SLACK_CS
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied and the like: it exists
        return True


def remove_stale_partials(parent: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Remove the ``prefix<pid>-<start>-<random>`` folders in ``parent`` whose owner is gone.

    Returns the removed paths. Names that do not parse and folders of live owners stay; a
    folder that cannot be removed is logged and skipped.
    """
    parent = Path(parent)
    pattern = re.compile(re.escape(prefix) + r"(\d+)-(\d+)-[0-9a-f]+")
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(prefix)]
    except OSError:  # no parent yet: nothing stale
        return []
    removed = []
    for path in candidates:
        m = pattern.fullmatch(path.name)
        if m is None or path.is_symlink() or not path.is_dir():
            continue
        if owner_alive(int(m.group(1)), int(m.group(2))):
            continue
        try:
            shutil.rmtree(path)
        except OSError as e:
            logger.warning("cannot remove %s, left by a process that is gone: %s", path, e)
            continue
        logger.info("removed %s, left by process %s that is gone", path, m.group(1))
        removed.append(path)
    return removed
