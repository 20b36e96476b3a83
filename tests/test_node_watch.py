"""MergedWatcher decisions without a DHT: size limit, unreachable providers, older rounds."""

from __future__ import annotations

import json
import time

from node.watch import MergedWatcher
from umm.net.records import Entry, MergedRecord
from umm.net.store import ModelStore

H = "ab" * 32


class FakeRecords:
    def __init__(self, record: MergedRecord | None):
        self.record = record
        self.provider_calls: list[str] = []

    def merged(self):
        return None if self.record is None else Entry(b"coord", self.record, time.time() + 60)

    def providers(self, manifest_hash: str):
        self.provider_calls.append(manifest_hash)
        return {}


class FakeRefresher:
    def __init__(self):
        self.jobs: dict = {}

    def add(self, name, fn, withdraw=None):
        self.jobs[name] = fn
        return True

    def discard(self, name):
        self.jobs.pop(name, None)


def record(round_: int = 1, total_bytes: int = 1000, address: str = "127.0.0.1:1") -> MergedRecord:
    return MergedRecord(round=round_, name="m", manifest_hash=H, total_bytes=total_bytes, address=address,
                        sources=[], method="ties", recipe_hash=H, scores={}, source_scores={}, published_at=0.0)


def watcher(records, tmp_path, max_bytes: int = 10**6) -> MergedWatcher:
    return MergedWatcher(records, ModelStore(tmp_path), None, FakeRefresher(), "127.0.0.1:2",
                         period=0.1, max_bytes=max_bytes, timeout=1.0, retries=1)


def test_nothing_published_means_nothing_to_do(tmp_path):
    w = watcher(FakeRecords(None), tmp_path)
    assert w.poll() is None and w.last_error is None


def test_a_model_over_the_size_limit_is_refused_once_and_never_fetched(tmp_path):
    records = FakeRecords(record(total_bytes=5 * 10**6))
    w = watcher(records, tmp_path, max_bytes=10**6)
    assert w.poll() is None and "max-merged-bytes" in w.last_error
    w.poll()
    assert records.provider_calls == []  # no provider was even looked up
    assert not any(w.store.partial_dir.iterdir()) and w.store.list() == []


def test_unreachable_providers_leave_an_error_and_nothing_in_the_store(tmp_path):
    records = FakeRecords(record(address="127.0.0.1:9"))  # nothing listens on the discard port
    w = watcher(records, tmp_path)
    assert w.poll() is None
    assert "round 1" in w.last_error and w.store.list() == []
    assert w.refresher.jobs == {}  # not announced as a provider
    w.poll()  # retried at the next poll
    assert records.provider_calls == [H, H]


class FakeServicer:
    def __init__(self):
        self.served: list[str] = []

    def register_folder(self, path, manifest):
        self.served.append(manifest.hash)


def stored_model(store: ModelStore, tmp_path, name: str) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(f'{{"name": "{name}"}}')
    return store.add_folder(folder)


def test_an_older_round_is_refused_after_a_restart(tmp_path):
    """Rollback: the node saw round 2; restarted, it refuses the still-signed round 1 (and a
    second model claiming round 2), then takes round 3."""
    from node.watch import HIGH_WATER_NAME

    store = ModelStore(tmp_path / "data")
    old, new, other, newest = (stored_model(store, tmp_path, n) for n in ("r1", "r2", "r2b", "r3"))
    state = tmp_path / "data" / HIGH_WATER_NAME

    def running(rec: MergedRecord) -> tuple[MergedWatcher, FakeRecords]:
        records = FakeRecords(rec)
        w = MergedWatcher(records, store, FakeServicer(), FakeRefresher(), "127.0.0.1:2", period=0.1,
                          max_bytes=10**6, timeout=1.0, retries=1, state_path=state)
        return w, records

    def rec(round_: int, h: str) -> MergedRecord:
        return record(round_=round_).copy(update={"manifest_hash": h})

    first, _ = running(rec(2, new))
    assert first.poll().round == 2 and first.servicer.served == [new]
    assert state.is_file()

    # restart: a fresh watcher over the same data dir; the coordinator's round-1 record is replayed
    again, records = running(rec(1, old))
    assert again.poll() is None and again.servicer.served == []
    assert "older than round 2" in again.last_error
    assert records.provider_calls == []  # nothing was looked up or fetched
    records.record = rec(2, other)
    assert again.poll() is None and "another model" in again.last_error
    records.record = rec(2, new)  # the same round-2 record is served again after the restart
    assert again.poll().manifest_hash == new
    records.record = rec(3, newest)
    assert again.poll().round == 3 and again.servicer.served == [new, newest]
    assert [m["round"] for m in json.loads(state.read_text()).values()] == [3]


def test_an_unreadable_high_water_file_counts_as_empty(tmp_path):
    from node.watch import HighWaterMark

    path = tmp_path / "hw.json"
    path.write_text("{not json")
    mark = HighWaterMark(path)
    assert mark.refusal(b"k", 1, H) is None
    mark.raise_to(b"k", 4, H)
    assert HighWaterMark(path).refusal(b"k", 3, H) is not None
    assert HighWaterMark(path).refusal(b"other coordinator", 3, H) is None
    assert [p.name for p in tmp_path.iterdir()] == ["hw.json"]  # no temporary file left
