"""Start and stop a hivemind DHT for a umm network, with our record validators and identity.

hivemind runs the DHT node in a forked background process, which starts hivemind's p2p daemon
(``p2pd``). Start it before creating gRPC servers or channels in the same process (gRPC does not
like being forked under it). Our DHT process differs from hivemind's in three ways:

- it leaves its owner's process group (and ``p2pd`` with it), so a terminal's Ctrl-C, which is
  sent to the whole foreground group, reaches only the owner: the owner can still withdraw its
  records through the DHT before it shuts the DHT down (hivemind's DHT process ignores SIGINT,
  but ``p2pd`` does not);
- on SIGTERM it ends ``p2pd`` and exits at once, whatever it was doing (hivemind's own shutdown
  ends ``p2pd``, a signal did not);
- started from the owner's main thread, it gets SIGTERM when the owner dies (Linux
  ``PR_SET_PDEATHSIG``), so a SIGKILLed owner does not leave a peer running under its identity;
- it reads each request from its owner whole. hivemind polls the request pipe through uvloop,
  which makes the pipe non-blocking, and then reads a message with a plain ``recv()``: a request
  larger than what the pipe holds at that moment (a value over the 64 KiB pipe buffer, or one
  caught between its length header and its body) failed with ``BlockingIOError``, the next read
  started mid-message, and the DHT process died (``EOFError``/unpickling error). That is what killed
  the coordinator's process on scores records of ~200 KB. Our process reads a message in blocking
  mode (the owner is writing the rest of it) and then hands the pipe back to the loop.

What can still outlive an owner (its DHT process SIGKILLed, another OS, a DHT started from a
thread) is recorded in a pid file (``start_dht(pid_file=...)``) and ended by the next start with
the same file (:func:`end_orphaned_dht`), which would otherwise find the identity "already taken
by another peer". :func:`stop_dht` shuts down and ends whatever is left.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from umm.atomic import write_json_atomic
from umm.net.errors import NetError
from umm.net.keys import load_or_create_key
from umm.net.records import DEFAULT_DHT_TIMEOUT, call_dht, check_network, make_validators

logger = logging.getLogger(__name__)

LOOPBACK_MADDRS = ("/ip4/127.0.0.1/tcp/0",)
#: pid file of a data dir's DHT processes (see module docstring)
DHT_PIDS = "dht.pids"
_PR_SET_PDEATHSIG = 1
#: seconds beyond hivemind's own ``startup_timeout`` that start_dht waits for the DHT to be ready
_READY_MARGIN = 15.0
#: seconds stop_dht gives a DHT to shut down before it is killed
STOP_TIMEOUT = 10.0


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` to this process when the thread that forked it exits."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _end_children(timeout: float = 5.0) -> None:
    """SIGTERM this process's children (``p2pd``), SIGKILL those still there after ``timeout``."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for c in children:
        try:
            c.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for c in alive:
        try:
            c.kill()
        except psutil.Error:
            pass


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    """End ``p2pd``, then this process, at once.

    Not ``raise SystemExit``: the signal may land inside one of hivemind's ``_run_coroutine``
    calls, whose ``except BaseException`` would swallow it and leave the process running.
    """
    signal.signal(signum, signal.SIG_IGN)
    try:
        _end_children()
    finally:
        os._exit(128 + signum)


class _WholeMessagePipe:
    """The DHT process's end of its request pipe, reading each message whole (see module docstring)."""

    def __init__(self, conn):
        self._conn = conn

    def fileno(self) -> int:
        return self._conn.fileno()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._conn.poll(timeout)

    def close(self) -> None:
        self._conn.close()

    def recv(self):
        fd = self._conn.fileno()
        was_blocking = os.get_blocking(fd)
        os.set_blocking(fd, True)
        try:
            return self._conn.recv()
        finally:
            os.set_blocking(fd, was_blocking)


@functools.cache
def _dht_class():
    """``hivemind.DHT`` whose background process behaves as the module docstring says."""
    import hivemind

    class OwnGroupDHT(hivemind.DHT):
        # set in the owner before start(); the forked child reads them
        _die_with_owner = False
        _owner_pid = 0

        def run(self) -> None:
            self._inner_pipe = _WholeMessagePipe(self._inner_pipe)
            try:
                os.setpgid(0, 0)
            except OSError as e:  # e.g. a session leader: Ctrl-C may then end p2pd early
                logger.debug("the DHT process keeps its process group: %s", e)
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
            if self._die_with_owner and _set_parent_death_signal(signal.SIGTERM) and os.getppid() != self._owner_pid:
                return  # the owner died before we asked to follow it
            try:
                super().run()
            finally:
                _end_children()

    return OwnGroupDHT


def start_dht(
    network: str,
    identity_path: str | os.PathLike[str],
    *,
    host_maddrs: Sequence[str] = LOOPBACK_MADDRS,
    announce_maddrs: Sequence[str] | None = None,
    initial_peers: Sequence[str] = (),
    coordinator_public_key: bytes | None = None,
    client_mode: bool = False,
    startup_timeout: float = 30.0,
    pid_file: str | os.PathLike[str] | None = None,
    **dht_kwargs,
):
    """Start and return a ``hivemind.DHT`` for ``network`` (stop it with :func:`stop_dht`).

    ``identity_path`` holds the peer's RSA key (created if missing): it fixes the peer id and
    signs the records (see :mod:`umm.net.keys`). ``host_maddrs`` are the libp2p listen addresses
    (loopback by default; ``/ip4/0.0.0.0/tcp/<port>`` to accept other machines), and
    ``initial_peers`` the multiaddrs of running peers to join (none for the first peer).
    ``pid_file`` (in the owner's data dir): first end the processes a killed previous owner left
    there, then record ours (stop with :func:`stop_dht` and the same file).
    """
    check_network(network)
    identity_path = Path(identity_path)
    key = load_or_create_key(identity_path)
    validators = make_validators(network, key, coordinator_public_key)
    if pid_file is not None:
        end_orphaned_dht(pid_file)
    dht = _dht_class()(
        initial_peers=list(initial_peers) or None,
        start=False,
        host_maddrs=list(host_maddrs),
        announce_maddrs=list(announce_maddrs) if announce_maddrs else None,
        identity_path=str(identity_path),
        record_validators=validators,
        client_mode=client_mode,
        startup_timeout=startup_timeout,
        **dht_kwargs,
    )
    # PR_SET_PDEATHSIG follows the forking *thread*: only the main thread lives as long as the owner
    dht._die_with_owner = threading.current_thread() is threading.main_thread()
    dht._owner_pid = os.getpid()
    try:
        dht.run_in_background(await_ready=True, timeout=startup_timeout + _READY_MARGIN)
    except Exception as e:
        if dht.is_alive():
            dht.terminate()
            dht.join(10)
        hint = " (check that the initial peers are running and reachable)" if initial_peers else ""
        raise NetError(f"could not start the DHT for network {network!r}: {e}{hint}") from e
    try:  # hivemind fetches and caches peer_id on first use with an unbounded call: cache it now, bounded
        dht._peer_id = call_dht(dht, "run_coroutine", startup_timeout, coro=type(dht)._get_peer_id)
    except Exception:
        stop_dht(dht)
        raise
    if pid_file is not None:
        record_dht_processes(dht, pid_file)
    logger.info("DHT for %s started: %s", network, ", ".join(visible_maddrs(dht)))
    return dht


def visible_maddrs(dht, timeout: float = DEFAULT_DHT_TIMEOUT) -> list[str]:
    """Multiaddrs (with ``/p2p/<peer id>``) that other peers can pass as ``initial_peers``.

    :class:`~umm.net.errors.DHTUnavailableError` when the DHT does not answer within ``timeout`` s."""
    coro = functools.partial(type(dht)._get_visible_maddrs, latest=False)
    return [str(m) for m in call_dht(dht, "run_coroutine", timeout, coro=coro)]


def stop_dht(dht, pid_file: str | os.PathLike[str] | None = None, timeout: float = STOP_TIMEOUT) -> None:
    """Shut ``dht`` down within about ``timeout`` seconds, killing it (and ``p2pd``) if it does not
    answer (stopped, hung); then end any of its recorded processes still running and drop ``pid_file``."""
    import psutil

    try:
        children = psutil.Process(dht.pid).children(recursive=True) if dht.is_alive() else []
    except (psutil.Error, ValueError, AssertionError):
        children = []
    try:
        # hivemind's shutdown writes to the DHT's request pipe, which blocks once the pipe is full
        closer = threading.Thread(target=dht.shutdown, name="umm-dht-shutdown", daemon=True)
        closer.start()
        closer.join(timeout)
        if dht.is_alive():
            logger.warning("the DHT process did not shut down within %.0f s; killing it", timeout)
            dht.kill()
            dht.join(timeout)
        _, alive = psutil.wait_procs(children, timeout=timeout / 2)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
    finally:
        if pid_file is not None:
            end_orphaned_dht(pid_file)


def record_dht_processes(dht, path: str | os.PathLike[str]) -> None:
    """Write the pid and start time of ``dht``'s process and its children (``p2pd``) to ``path``."""
    import psutil

    path = Path(path)
    try:
        root = psutil.Process(dht.pid)
        procs = [root, *root.children(recursive=True)]
        entries = [{"pid": p.pid, "create_time": p.create_time()} for p in procs]
    except (psutil.Error, ValueError) as e:
        logger.warning("cannot record the DHT's processes: %s", e)
        return
    write_json_atomic(path, entries)


def end_orphaned_dht(path: str | os.PathLike[str]) -> int:
    """End the DHT processes recorded in ``path`` that still run (only where pid *and* start time
    match, so a reused pid is never hit), remove ``path``; returns how many were ended."""
    import psutil

    path = Path(path)
    if not path.is_file():
        return 0
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        entries = []
    ended = []
    for e in entries if isinstance(entries, list) else []:
        try:
            p = psutil.Process(int(e["pid"]))
            if abs(p.create_time() - float(e["create_time"])) > 0.01 or p.status() == psutil.STATUS_ZOMBIE:
                continue
            p.kill()
            ended.append(p)
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue
    psutil.wait_procs(ended, timeout=10)
    path.unlink(missing_ok=True)
    if ended:
        logger.warning("ended %d DHT process(es) left running by a previous owner of %s", len(ended), path.parent)
    return len(ended)
