"""MergedWatcher decisions without a DHT: size limit, unreachable providers, older rounds."""

from __future__ import annotations

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
