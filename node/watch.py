"""Fetch each new merged model the coordinator publishes, then serve it too.

:class:`MergedWatcher` polls ``records.merged()`` every ``period`` seconds. Only records signed
by the configured coordinator key are ever returned by :class:`~umm.net.records.NetworkRecords`,
so a forged record is never acted on. For a new round it downloads the model from the record's
own address and every announced provider (:func:`umm.net.transfer.download`: hash-checked,
resumable, only a verified model enters the store), registers it with the gRPC servicer and
announces itself as a provider (refreshed with the other records). A failed download is retried
at the next poll, resuming its partial files; records for older rounds are ignored.

Rollback: the highest round seen from each coordinator key is kept in ``state_path`` (in the
node's data dir, replaced atomically), so a node restarted while an older, still validly signed
merged record circulates refuses it instead of fetching and serving it again. A record of the
same round with another model is refused too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from umm.atomic import write_json_atomic
from umm.errors import UmmError
from umm.ui import Bars, human_bytes

logger = logging.getLogger(__name__)

PROVIDER_JOB_PREFIX = "provider:"
#: file in the node's data dir: the highest merged round seen per coordinator key
HIGH_WATER_NAME = "merged_high_water.json"


class HighWaterMark:
    """Highest merged round (and its model) accepted per coordinator key, persisted in ``path``.

    The file maps sha256(coordinator public key) to ``{"round": n, "manifest_hash": h}``; it is
    written to a temporary file and renamed over the old one. An unreadable file counts as empty
    (and is logged): the node then behaves as one started fresh."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._marks: dict[str, dict[str, Any]] = self._load()

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable %s: %s", self.path, e)
            return {}
        if not isinstance(data, dict):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("round"), int)
                and isinstance(v.get("manifest_hash"), str)}

    @staticmethod
    def _id(coordinator_key: bytes) -> str:
        return hashlib.sha256(bytes(coordinator_key)).hexdigest()

    def refusal(self, coordinator_key: bytes, round_: int, manifest_hash: str) -> str | None:
        """Why a record of ``round_`` with ``manifest_hash`` is refused, or None if it is not."""
        mark = self._marks.get(self._id(coordinator_key))
        if mark is None:
            return None
        if round_ < mark["round"]:
            return f"round {round_} is older than round {mark['round']}, already seen from this coordinator"
        if round_ == mark["round"] and manifest_hash != mark["manifest_hash"]:
            return f"round {round_} was already published with another model ({mark['manifest_hash'][:12]})"
        return None

    def raise_to(self, coordinator_key: bytes, round_: int, manifest_hash: str) -> None:
        """Record ``round_`` as seen (only ever upward) and persist it."""
        key = self._id(coordinator_key)
        mark = self._marks.get(key)
        if mark is not None and mark["round"] >= round_:
            return
        self._marks[key] = {"round": int(round_), "manifest_hash": manifest_hash}
        if self.path is None:
            return
        try:
            write_json_atomic(self.path, self._marks)
        except OSError as e:
            logger.warning("could not save the merged-round high-water mark to %s: %s", self.path, e)


@dataclass(frozen=True)
class MergedModel:
    """A merged model this node holds and serves."""

    round: int
    name: str
    manifest_hash: str
    path: Path


class MergedWatcher:
    """Background thread: follow the coordinator's merged-model record (see module docstring)."""

    def __init__(
        self,
        records: Any,  # umm.net.records.NetworkRecords with the coordinator key
        store: Any,  # umm.net.store.ModelStore
        servicer: Any,  # umm.net.server.CheckpointServicer
        refresher: Any,  # umm.net.records.Refresher
        address: str,  # our gRPC address, announced as a provider
        *,
        period: float,
        max_bytes: int,
        show_progress: bool = False,
        timeout: float = 30.0,
        retries: int = 3,
        state_path: Path | None = None,  # high-water mark file (None: kept in memory only)
    ):
        if period <= 0:
            raise ValueError("period must be positive")
        self.records = records
        self.store = store
        self.servicer = servicer
        self.refresher = refresher
        self.address = address
        self.period = period
        self.max_bytes = max_bytes
        self.show_progress = show_progress
        self.timeout = timeout
        self.retries = retries
        self.current: MergedModel | None = None
        self.last_error: str | None = None
        self._refused: set[str] = set()  # hashes we will not fetch (over the size limit)
        self.high_water = HighWaterMark(state_path)
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="umm-merged-watcher", daemon=True)

    def start(self) -> MergedWatcher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop polling; a download in progress is cancelled and keeps its partial files."""
        self._stop.set()
        self._cancel.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as e:  # keep watching: the DHT or providers may come back
                logger.warning("checking for a merged model failed: %s", e)
            self._stop.wait(self.period)

    def poll(self) -> MergedModel | None:
        """Check the record once; download and serve a new round. Returns the model now served."""
        from umm.net.errors import SizeLimitError
        from umm.net.transfer import download

        entry = self.records.merged()
        if entry is None:
            return self.current
        rec = entry.record
        h = rec.manifest_hash
        if self.current is not None and (h == self.current.manifest_hash or rec.round < self.current.round):
            return self.current
        if h in self._refused:
            return self.current
        refusal = self.high_water.refusal(entry.owner, rec.round, h)
        if refusal is not None:
            if self.last_error != f"refused merged record: {refusal}":
                logger.warning("refused merged record of round %d (%s): %s", rec.round, h[:12], refusal)
            self.last_error = f"refused merged record: {refusal}"
            return self.current
        if rec.total_bytes > self.max_bytes:
            self._refused.add(h)
            self.last_error = (f"merged model of round {rec.round} is {human_bytes(rec.total_bytes)}, over "
                               f"--max-merged-bytes {human_bytes(self.max_bytes)}; not fetched")
            logger.warning("%s", self.last_error)
            return self.current
        self.high_water.raise_to(entry.owner, rec.round, h)  # before fetching: older rounds are refused from now on
        providers = [rec.address] + sorted(
            e.record.address for e in self.records.providers(h).values() if e.record.address != self.address
        )
        logger.info("round %d: fetching merged model %s (%s) from %d provider(s)",
                    rec.round, h[:12], human_bytes(rec.total_bytes), len(set(providers)))
        try:
            path = download(h, providers, self.store, max_bytes=self.max_bytes,
                            on_progress=Bars() if self.show_progress else None, timeout=self.timeout,
                            retries=self.retries, cancel=self._cancel)
        except SizeLimitError as e:  # the manifest is larger than the record said: never retry
            self._refused.add(h)
            self.last_error = f"round {rec.round}: {e}"
            logger.warning("%s", self.last_error)
            return self.current
        except UmmError as e:
            if self._stop.is_set():
                return self.current
            self.last_error = f"round {rec.round}: {e}"
            logger.warning("could not fetch merged model %s: %s (retrying in %.0f s)", h[:12], e, self.period)
            return self.current
        self.servicer.register_folder(path, self.store.manifest(h))
        previous = self.current
        self.current = MergedModel(round=rec.round, name=rec.name, manifest_hash=h, path=path)
        self.last_error = None
        self.refresher.add(PROVIDER_JOB_PREFIX + h,
                           lambda ttl: self.records.announce_provider(h, self.address, ttl=ttl),
                           withdraw=lambda ttl: self.records.withdraw_provider(h, ttl=ttl))
        if previous is not None:  # keep its files served, but stop advertising the old round
            self.refresher.discard(PROVIDER_JOB_PREFIX + previous.manifest_hash)
        logger.info("round %d: merged model %s verified, stored in %s and served", rec.round, h[:12], path)
        return self.current
