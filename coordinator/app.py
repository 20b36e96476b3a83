"""The running coordinator: DHT peer, record publisher, checkpoint server, status service and
the round loop. Usable in-process (tests, ``umm net local``) and by ``umm-coordinator run``.

Start order matters: the hivemind DHT forks its own process, so it starts before any gRPC server.
The DHT's processes are recorded in ``<data_dir>/dht.pids`` (:mod:`umm.net.dht`): a restart after
a SIGKILL ends what the killed run left. :meth:`Coordinator.stop` withdraws the coordinator's
provider record (it no longer serves the merged model); the scores and merged-model records stay
until they expire, since they describe the network, not this process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from coordinator.config import CoordinatorConfig
from coordinator.db import RoundRow, StateDB
from coordinator.round import RoundContext, RoundRunner

if TYPE_CHECKING:
    from umm.net.ready import Ready

logger = logging.getLogger(__name__)

STATE_DB = "state.db"


class Coordinator:
    """One coordinator (see module docstring). ``start()``, then ``run_round()`` or ``run()``; ``stop()``."""

    def __init__(self, config: CoordinatorConfig, *, on_step: Callable[[int, str], None] | None = None):
        self.config = config
        self.on_step = on_step
        self.stop_event = threading.Event()
        self.dht: Any = None
        self.checkpoint_server: Any = None
        self.status_server: Any = None
        self.dashboard: Any = None  # coordinator.dashboard.server.DashboardServer, when config.dashboard is set
        self.refresher: Any = None
        self.records: Any = None
        self.store: Any = None
        self.db: StateDB | None = None
        self.address = ""

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> Coordinator:
        from coordinator.status import StatusServer, StatusServicer
        from umm import __version__
        from umm.net.dht import DHT_PIDS, start_dht
        from umm.net.keys import load_or_create_key, public_key_bytes, public_key_text
        from umm.net.records import NetworkRecords, Refresher
        from umm.net.server import CheckpointServer, CheckpointServicer
        from umm.net.store import ModelStore

        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        key = load_or_create_key(cfg.key_path)
        self.public_key = public_key_bytes(key)
        self.public_key_text = public_key_text(key)
        self.db = StateDB(cfg.data_dir / STATE_DB)
        try:
            self.dht = start_dht(
                cfg.network, cfg.key_path, host_maddrs=cfg.host_maddrs, announce_maddrs=cfg.announce_maddrs or None,
                initial_peers=cfg.initial_peers, coordinator_public_key=self.public_key,
                pid_file=cfg.data_dir / DHT_PIDS,
            )
            self.store = ModelStore(cfg.data_dir)
            self.checkpoint_server = CheckpointServer(CheckpointServicer(self.store), host=cfg.grpc_host,
                                                      port=cfg.grpc_port)
            self.address = cfg.public_address or self.checkpoint_server.address
            self.records = NetworkRecords(self.dht, cfg.network, key, self.public_key, timeout=cfg.dht_timeout)
            self.refresher = Refresher(cfg.refresh_period, name="umm-coordinator-refresh").start()
            info = {"network": cfg.network, "public_key": self.public_key_text, "version": __version__,
                    "address": self.address}
            self.status_server = StatusServer(StatusServicer(str(self.db.path), lambda: info), host=cfg.grpc_host,
                                              port=cfg.status_port)
            (cfg.data_dir / "status_address").write_text(self.status_server.address + "\n")
            if cfg.dashboard:  # after the DHT has forked, as the gRPC servers
                from coordinator.dashboard.address import URL_FILE
                from coordinator.dashboard.server import for_coordinator

                self.dashboard = for_coordinator(self, cfg.dashboard)
                (cfg.data_dir / URL_FILE).write_text(self.dashboard.url + "\n")
            self._republish()
        except BaseException:
            self.stop()
            raise
        logger.info("coordinator of %s: files at %s, status at %s", cfg.network, self.address,
                    self.status_server.address)
        return self

    def _republish(self) -> None:
        """After a restart, keep the latest scores and merged records alive (re-stored every period)."""
        from umm.net.records import MergedRecord

        rank = self.db.latest_done_step("rank")
        if rank is not None:
            scores = rank.result.scores_record()
            self.refresher.add("scores", lambda ttl: self.records.publish_scores(scores, ttl=ttl))
        last = self.db.last_published_round()
        if last is None:
            return
        step = self.db.step(last.number, "publish")
        published = step.result.merged_record() if step is not None and step.result is not None else None
        if published is None or not self.store.has(last.merged_hash):
            return
        record = MergedRecord(**{**published.dict(), "address": self.address})
        self.refresher.add("merged", lambda ttl: self.records.publish_merged(record, ttl=ttl))
        h = record.manifest_hash
        self.refresher.add("provider", lambda ttl: self.records.announce_provider(h, self.address, ttl=ttl),
                           withdraw=lambda ttl: self.records.withdraw_provider(h, ttl=ttl))

    def stop(self) -> None:
        """Stop the rounds, withdraw the provider record, stop serving, leave the DHT. Idempotent.

        Bounded: each step has a deadline (:mod:`umm.net.shutdown`); a round in progress is
        interrupted by the caller (``umm-coordinator run`` turns SIGTERM into Ctrl-C) or stops at
        its next step once :attr:`stop_event` is set."""
        from umm.net.dht import DHT_PIDS
        from umm.net.shutdown import leave_dht, stop_server, withdraw_records

        self.stop_event.set()
        t0 = time.monotonic()
        if self.refresher is not None:
            refresher, self.refresher = self.refresher, None
            withdraw_records(refresher)  # the DHT is still up: Ctrl-C does not reach its process group
        if self.dashboard is not None:
            dashboard, self.dashboard = self.dashboard, None
            dashboard.stop()
        for server in (self.status_server, self.checkpoint_server):
            if server is not None:
                stop_server(server, grace=None)
        if self.dht is not None:
            dht, self.dht = self.dht, None
            leave_dht(dht, self.config.data_dir / DHT_PIDS)
        if self.db is not None:
            self.db.close()
        logger.info("coordinator stopped in %.1f s", time.monotonic() - t0)

    def __enter__(self) -> Coordinator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # info --------------------------------------------------------------------------------------
    @property
    def maddrs(self) -> list[str]:
        from umm.net.dht import visible_maddrs

        return visible_maddrs(self.dht)

    @property
    def status_address(self) -> str:
        return self.status_server.address

    def ready(self, maddrs: list[str] | None = None) -> Ready:
        """The :class:`umm.net.ready.Ready` of this started coordinator (``maddrs``: :attr:`maddrs`, if known)."""
        from umm.net.ready import Ready

        return Ready(role="coordinator", network=self.config.network, peer_id=str(self.dht.peer_id), pid=os.getpid(),
                     initial_peers=self.maddrs if maddrs is None else maddrs, checkpoint_address=self.address,
                     status_address=self.status_address)

    # rounds --------------------------------------------------------------------------------------
    def context(self) -> RoundContext:
        return RoundContext(config=self.config, db=self.db, store=self.store, records=self.records,
                            address=self.address, refresher=self.refresher, stop=self.stop_event,
                            on_step=self.on_step)

    def run_round(self) -> RoundRow:
        """Resume the unfinished round or run a new one; returns the round's row."""
        return RoundRunner(self.context()).run()

    def run(self, rounds: int | None = None) -> None:
        """Run rounds every ``round_interval`` seconds until :meth:`stop` (or ``rounds`` rounds)."""
        done = 0
        while not self.stop_event.is_set():
            row = self.run_round()
            done += 1
            logger.info("round %d: %s %s", row.number, row.state, row.reason)
            if rounds is not None and done >= rounds:
                return
            self.stop_event.wait(self.config.round_interval)
