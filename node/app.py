"""The node: admit our model, announce it, serve it, and fetch and re-serve merged models.

:class:`Node` is pure wiring of :mod:`umm.net` and :mod:`umm.checkpoints`; the CLI and tests
(and ``umm net local``) run it in-process::

    node = Node(NodeConfig(model=..., domains=["math"], coordinator_public_key=key))
    node.start()          # admission first: a bad model raises before anything is announced
    node.run_forever()    # until stop() (e.g. from a signal handler)
    node.stop()           # withdraw our records, stop serving, leave the DHT

Order in :meth:`Node.start`: admission (raises :class:`CheckpointError`), data-dir lock, DHT
(hivemind forks, so before any gRPC object exists in this process), gRPC server, records
(announced at once, then refreshed every ``refresh_period`` with a TTL of twice that), watcher.
The DHT runs in its own process group (:mod:`umm.net.dht`), so Ctrl-C in a terminal stops the
node through :meth:`Node.stop`, which withdraws the records before it shuts the DHT down.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import umm
from node.config import NodeConfig, grpc_address
from node.watch import HIGH_WATER_NAME, MergedWatcher
from umm.checkpoints.admission import AdmissionLimits, AdmissionReport, admit
from umm.errors import UmmError
from umm.ui import Bars

logger = logging.getLogger(__name__)

EXPERT_JOB = "expert"
#: seconds to wait for the watcher's and refresher's threads (a download is cancelled at once; a
#: DHT read in progress is abandoned: the threads are daemons)
WATCHER_STOP_TIMEOUT = 2.0


class NodeError(UmmError):
    """The node cannot run as asked (data dir in use, port taken, ...)."""


@dataclass(frozen=True)
class NodeInfo:
    """What a started node tells its user: where others reach it and what it announced."""

    peer_id: str
    public_key: str
    dht_maddrs: list[str]  # give these to other peers as --initial-peers
    grpc_address: str
    manifest_hash: str
    total_bytes: int
    data_dir: Path


def check_model(model: Path, max_total_bytes: int) -> AdmissionReport:
    """The coordinator's admission checks on our own model, so problems show before announcing."""
    return admit(model, AdmissionLimits(max_total_bytes=max_total_bytes), on_progress=Bars())


class Node:
    """One contributor node (see module docstring). Not restartable: make a new one."""

    def __init__(self, config: NodeConfig, *, report: AdmissionReport | None = None):
        """``report``: the result of :func:`check_model` on ``config.model`` if the caller already ran it."""
        self.config = config
        self.report: AdmissionReport | None = report
        self.dht: Any = None
        self.server: Any = None
        self.records: Any = None
        self.refresher: Any = None
        self.watcher: MergedWatcher | None = None
        self.store: Any = None
        self.info: NodeInfo | None = None
        self._lock_fh: Any = None
        self._stopping = threading.Event()
        self._stopped = False

    # lifecycle -------------------------------------------------------------------------------
    def start(self) -> NodeInfo:
        """Admit, announce and serve; returns the node's addresses. Cleans up if any step fails."""
        cfg = self.config
        if self.report is None:
            self.report = check_model(cfg.model, cfg.max_model_bytes)  # nothing started yet
        try:
            self._start_services()
        except BaseException:
            self.stop(withdraw=False)
            raise
        assert self.info is not None
        return self.info

    def _start_services(self) -> None:
        from umm.net.dht import DHT_PIDS, start_dht, visible_maddrs
        from umm.net.keys import load_or_create_key, public_key_text
        from umm.net.records import ExpertRecord, NetworkRecords, Refresher

        cfg, report = self.config, self.report
        assert report is not None
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_data_dir()
        key = load_or_create_key(cfg.identity)

        self.dht = start_dht(
            cfg.network, cfg.identity, host_maddrs=cfg.host_maddrs(), announce_maddrs=cfg.announce_maddrs(),
            initial_peers=cfg.initial_peers, coordinator_public_key=cfg.coordinator_public_key,
            pid_file=cfg.data_dir / DHT_PIDS,  # the data-dir lock is ours: what is recorded there is a dead node's
        )
        # gRPC only after the DHT process has forked
        from umm.net.server import CheckpointServer, CheckpointServicer
        from umm.net.store import ModelStore

        self.store = ModelStore(cfg.data_dir)
        servicer = CheckpointServicer(self.store)
        servicer.register_folder(cfg.model, report.manifest)
        try:
            self.server = CheckpointServer(servicer, host=cfg.host, port=cfg.port)
        except UmmError as e:
            raise NodeError(f"cannot serve the model over gRPC: {e}") from e
        address = grpc_address(cfg.advertised_host, self.server.port)

        self.records = NetworkRecords(self.dht, cfg.network, key, cfg.coordinator_public_key)
        fp = report.fingerprint
        record = ExpertRecord(
            name=cfg.name or cfg.model.resolve().name,
            domains=list(dict.fromkeys(cfg.domains)),
            architecture=fp.architecture,
            tokenizer=fp.tokenizer or "",
            num_parameters=report.num_parameters,
            manifest_hash=report.manifest.hash,
            total_bytes=report.manifest.total_bytes,
            address=address,
            self_scores={k: float(v) for k, v in cfg.self_scores.items()},
            base_model=cfg.base_model,
            software_version=umm.__version__,
        )
        self.refresher = Refresher(cfg.refresh_period, name="umm-node-refresher")
        if not self.refresher.add(EXPERT_JOB, lambda ttl: self.records.announce_expert(record, ttl=ttl),
                                  withdraw=lambda ttl: self.records.withdraw_expert(ttl=ttl)):
            logger.warning("the first announcement of %s was not stored; retrying every %.0f s",
                           record.name, cfg.refresh_period)
        self.refresher.start()
        if cfg.coordinator_public_key is not None:
            self.watcher = MergedWatcher(
                self.records, self.store, servicer, self.refresher, address,
                period=cfg.poll_period, max_bytes=cfg.max_merged_bytes, show_progress=cfg.show_progress,
                state_path=cfg.data_dir / HIGH_WATER_NAME,
            )
            self.watcher.start()
        else:
            logger.warning("no coordinator key given: merged models will not be fetched")
        self.info = NodeInfo(
            peer_id=str(self.dht.peer_id), public_key=public_key_text(key), dht_maddrs=visible_maddrs(self.dht),
            grpc_address=address, manifest_hash=report.manifest.hash, total_bytes=report.manifest.total_bytes,
            data_dir=cfg.data_dir,
        )
        logger.info("node %s announced %s (%s) at %s", self.info.peer_id, record.name, record.manifest_hash[:12], address)

    def run_forever(self) -> None:
        """Block until :meth:`request_stop` (or :meth:`stop`) is called; then stop the node."""
        while not self._stopping.wait(0.5):
            pass
        self.stop()

    def request_stop(self) -> None:
        """Ask :meth:`run_forever` to return (safe from a signal handler)."""
        self._stopping.set()

    def stop(self, *, withdraw: bool = True) -> None:
        """Stop refreshing, withdraw our expert and provider records (unless ``withdraw=False``),
        stop serving and leave the DHT. Safe to call more than once and after a failed :meth:`start`.

        Bounded: each step has a deadline (:mod:`umm.net.shutdown`), a download in progress is
        cancelled, so the node stops within about 25 s whatever the network does (a few seconds
        when it answers)."""
        from umm.net.shutdown import leave_dht, stop_server, withdraw_records

        self._stopping.set()
        if self._stopped:
            return
        self._stopped = True
        t0 = time.monotonic()
        if self.watcher is not None:
            self.watcher.stop(timeout=WATCHER_STOP_TIMEOUT)
        if self.refresher is not None:
            if withdraw:  # while the DHT is up (it is in its own process group: Ctrl-C did not end it)
                withdraw_records(self.refresher)
            else:
                self.refresher.stop(timeout=WATCHER_STOP_TIMEOUT)
        if self.server is not None:
            stop_server(self.server, grace=1.0)
        if self.dht is not None:
            from umm.net.dht import DHT_PIDS

            leave_dht(self.dht, self.config.data_dir / DHT_PIDS)
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None
        logger.info("node stopped in %.1f s", time.monotonic() - t0)

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers ---------------------------------------------------------------------------------
    def _lock_data_dir(self) -> None:
        path = self.config.data_dir / "node.lock"
        fh = open(path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise NodeError(
                f"{self.config.data_dir} is used by another running node; give each node its own --data-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self._lock_fh = fh
