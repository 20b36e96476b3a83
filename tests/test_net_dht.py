"""DHT records on a real 2-peer hivemind swarm on 127.0.0.1: who may write what, shapes, expiry;
scores of 1,000 experts in pages; requests larger than the DHT's request pipe; and a DHT process
that stops answering (every call fails with a typed error instead of blocking)."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import pytest

from umm.net import keys, records
from umm.net.dht import start_dht, stop_dht, visible_maddrs
from umm.net.errors import DHTUnavailableError, RecordError
from umm.net.records import (
    ExpertRecord,
    ExpertVerdict,
    MergedRecord,
    NetworkRecords,
    ProviderRecord,
    Refresher,
    ScoresRecord,
)

NET = "testnet"
H1, H2, H3 = "1" * 64, "2" * 64, "3" * 64


def expert(name: str = "math-7b", manifest_hash: str = H1) -> ExpertRecord:
    return ExpertRecord(
        name=name, domains=["math"], architecture="llama:abc", tokenizer="tok:def", num_parameters=1000,
        manifest_hash=manifest_hash, total_bytes=4096, address="127.0.0.1:50051",
        self_scores={"gsm8k": 0.5}, base_model=None, software_version="0.1.0",
    )


def merged(round_: int = 1) -> MergedRecord:
    return MergedRecord(
        round=round_, name=f"merged-r{round_}", manifest_hash=H3, total_bytes=10, address="127.0.0.1:6000",
        sources=[H1, H2], method="ties", recipe_hash=H2, scores={"gsm8k": 0.7},
        source_scores={H1: {"gsm8k": 0.5}, H2: {"gsm8k": 0.4}}, published_at=1.0,
    )


def verdicts(n: int) -> dict[str, ExpertVerdict]:
    out = {}
    for i in range(n):
        h = hashlib.sha256(str(i).encode()).hexdigest()
        if i % 3:
            out[h] = ExpertVerdict(admitted=False, reason=f"not fetched yet: provider 127.0.0.1:{9000 + i} refused "
                                   "the connection (UNAVAILABLE: failed to connect to all addresses) " + "x" * 200,
                                   scores={}, ranks={})
        else:
            out[h] = ExpertVerdict(admitted=True, reason="admitted", scores={"synth-math": i / n, "synth-code": 0.5},
                                   ranks={"math": i // 3 + 1, "code": i // 3 + 1})
    return out


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Peer A = coordinator, peer B = contributor; both trust the coordinator's key."""
    root = tmp_path_factory.mktemp("dht")
    coord_key = keys.load_or_create_key(root / "coord.key")
    coord_pub = keys.public_key_bytes(coord_key)
    dhts = []
    try:
        a = start_dht(NET, root / "coord.key", coordinator_public_key=coord_pub)
        dhts.append(a)
        b = start_dht(NET, root / "peer.key", initial_peers=visible_maddrs(a), coordinator_public_key=coord_pub)
        dhts.append(b)
        yield {
            "a": a, "b": b, "coord_pub": coord_pub, "root": root,
            "ra": NetworkRecords(a, NET, coord_key, coord_pub),
            "rb": NetworkRecords(b, NET, keys.load_key(root / "peer.key"), coord_pub),
        }
    finally:
        for d in dhts:
            d.shutdown()


def test_identity_file_gives_peer_id_and_signing_key(swarm):
    assert str(swarm["a"].peer_id) == keys.peer_id_of(swarm["root"] / "coord.key")
    assert all("/p2p/" in m for m in visible_maddrs(swarm["a"]))


def test_peer_writes_only_its_own_expert_subkey(swarm):
    ra, rb = swarm["ra"], swarm["rb"]
    assert rb.announce_expert(expert())
    seen = ra.experts()
    assert seen[rb.public_key].record == expert()

    # A forges an entry under B's subkey: it cannot sign for B's key, so every peer refuses it.
    forged = records.to_value(expert(name="forged", manifest_hash=H2))
    assert not records.store_value(swarm["a"], records.experts_key(NET), rb.owner, forged, ttl=60)
    assert ra.experts()[rb.public_key].record.name == "math-7b"
    assert rb.experts()[rb.public_key].record.manifest_hash == H1
    # the owner can withdraw its record (hivemind has no delete: a signed None replaces it)
    assert rb.withdraw_expert()
    assert rb.public_key not in ra.experts()


def test_wrong_shaped_values_are_rejected(swarm):
    rb = swarm["rb"]
    key = records.experts_key(NET)
    good = records.to_value(expert(name="shape"))
    assert not records.store_value(swarm["b"], key, rb.owner, {**good, "num_parameters": "1000"}, ttl=60)
    assert not records.store_value(swarm["b"], key, rb.owner, {**good, "extra": 1}, ttl=60)
    assert not records.store_value(swarm["b"], key, rb.owner, {k: v for k, v in good.items() if k != "name"}, ttl=60)
    assert not records.store_value(swarm["b"], key, rb.owner, {**good, "schema_version": 99}, ttl=60)
    fat = {**good, "domains": [f"domain-{i:03d}-" + "d" * 100 for i in range(40)]}  # within the list bounds
    assert not records.store_value(swarm["b"], key, rb.owner, fat, ttl=60)  # but over 4 KiB in all
    assert not records.store_value(swarm["b"], key, rb.owner, b"not a dict", ttl=60)
    # an entry without an owner marker is refused for schema keys
    assert not records.store_value(swarm["b"], key, b"plain-subkey", good, ttl=60)
    with pytest.raises(records.RecordError):
        records.parse_record(ExpertRecord, {**good, "total_bytes": 1.5})


def test_only_the_coordinator_writes_merged_records(swarm):
    ra, rb = swarm["ra"], swarm["rb"]
    # B signs a merged record under its own key: refused by peers that know the coordinator key.
    assert not rb.publish_merged(merged(round_=99))
    # B forges one under the coordinator's subkey: the signature check refuses it.
    assert not records.store_value(swarm["b"], records.merged_key(NET), ra.owner, records.to_value(merged(98)), 60)
    assert rb.merged() is None
    assert ra.publish_merged(merged(round_=1))
    entry = rb.merged()
    assert entry is not None and entry.record.round == 1 and entry.owner == swarm["coord_pub"]


def test_reader_ignores_merged_records_from_untrusted_keys(swarm, tmp_path):
    # Peer C runs without the coordinator key, so it keeps a merged record signed by its own key;
    # a reader that trusts only the coordinator's key still ignores that record.
    assert swarm["ra"].publish_merged(merged(round_=2))
    c = start_dht(NET, tmp_path / "c.key", initial_peers=visible_maddrs(swarm["a"]))
    try:
        c_key = keys.load_key(tmp_path / "c.key")
        c_pub = keys.public_key_bytes(c_key)
        NetworkRecords(c, NET, c_key).publish_merged(merged(round_=7))  # A and B refuse; C keeps it
        everything = records.read_entries(c, records.merged_key(NET), MergedRecord)
        assert everything[c_pub].record.round == 7  # the untrusted record is really there
        entry = NetworkRecords(c, NET, c_key, coordinator_public_key=swarm["coord_pub"]).merged()
        assert entry is not None and entry.owner == swarm["coord_pub"] and entry.record.round == 2
        with pytest.raises(records.RecordError):
            NetworkRecords(c, NET, c_key).merged()  # no coordinator key configured: refuse to guess
    finally:
        c.shutdown()


def test_providers_and_expiry_without_refresh(swarm):
    ra, rb = swarm["ra"], swarm["rb"]
    assert rb.announce_provider(H3, "127.0.0.1:7000", ttl=2.0)
    assert ra.providers(H3)[rb.public_key].record == ProviderRecord(manifest_hash=H3, address="127.0.0.1:7000")
    # a provider entry of the wrong shape (not schema-checked by the DHT) is dropped on read
    bad = {"schema_version": 1, "manifest_hash": H3, "address": "no port"}
    assert records.store_value(swarm["a"], records.providers_key(NET, H3), ra.owner, bad, ttl=2.0)
    assert ra.public_key not in rb.providers(H3)
    time.sleep(2.5)
    assert ra.providers(H3) == {}


def test_refresher_keeps_records_alive_and_stops(swarm):
    ra, rb = swarm["ra"], swarm["rb"]
    refresher = Refresher(period=1.0)
    assert refresher.add("provider", lambda ttl: rb.announce_provider(H2, "127.0.0.1:7001", ttl=ttl))
    with refresher:
        time.sleep(3.0)  # > TTL (2 s): only refreshes keep the record
        assert rb.public_key in ra.providers(H2)
    assert not refresher._thread.is_alive()
    time.sleep(3.0)
    assert ra.providers(H2) == {}


def test_withdraw_all_withdraws_registered_records_at_once(swarm):
    ra, rb = swarm["ra"], swarm["rb"]
    refresher = Refresher(period=30.0)  # records live 60 s: only a withdrawal removes them within the test
    assert refresher.add("provider", lambda ttl: rb.announce_provider(H1, "127.0.0.1:7002", ttl=ttl),
                         withdraw=lambda ttl: rb.withdraw_provider(H1, ttl=ttl))
    assert refresher.add("kept", lambda ttl: rb.announce_provider(H3, "127.0.0.1:7003", ttl=ttl))  # no withdrawal
    refresher.start()
    assert rb.public_key in ra.providers(H1) and rb.public_key in ra.providers(H3)
    assert refresher.withdraw_all() == {"provider": True}
    assert not refresher._thread.is_alive()
    assert ra.providers(H1) == {} and rb.public_key in ra.providers(H3)


async def _busy_in_dht_process(_dht, _node) -> None:
    """Block the DHT process inside one of hivemind's ``_run_coroutine`` calls (which catch
    ``BaseException``), where a SIGTERM once got swallowed."""
    time.sleep(20)


def test_dht_processes_leave_the_owners_group_and_are_recorded(tmp_path):
    """The DHT process and p2pd sit in their own process group (a terminal's Ctrl-C does not reach
    them); a pid file records them; SIGTERM to the DHT process ends p2pd too, even while it runs a
    request; a start with the same pid file ends what a dead owner left; stop_dht leaves nothing."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from umm.net.dht import end_orphaned_dht, stop_dht

    pids = tmp_path / "dht.pids"
    dht = start_dht(NET, tmp_path / "id.key", pid_file=pids)
    try:
        recorded = [psutil.Process(e["pid"]) for e in json.loads(pids.read_text())]
        assert [p.pid for p in recorded][0] == dht.pid and "p2pd" in recorded[1].name()
        assert {os.getpgid(p.pid) for p in recorded} == {dht.pid} != {os.getpgid(0)}
        dht.run_coroutine(_busy_in_dht_process, return_future=True)
        time.sleep(1.0)  # let the DHT process pick the request up
        os.kill(dht.pid, signal.SIGTERM)
        dht.join(30)
        _, alive = psutil.wait_procs(recorded, timeout=10)
        assert not alive  # p2pd did not outlive its DHT process

        # an orphan: the DHT of an owner killed with SIGKILL, started from a thread (so it does not
        # follow its owner's death), still running under the identity
        code = ("import threading, time; from umm.net.dht import start_dht; "
                f"t = threading.Thread(target=start_dht, args=({NET!r}, {str(tmp_path / 'id.key')!r}), "
                f"kwargs={{'pid_file': {str(pids)!r}}}); t.start(); t.join(); print('up', flush=True); time.sleep(600)")
        owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert owner.stdout.readline().strip() == "up"
        finally:
            owner.kill()
            owner.wait()
        orphans = [psutil.Process(e["pid"]) for e in json.loads(pids.read_text())]
        assert len(orphans) == 2 and all(p.is_running() for p in orphans)
        dht = start_dht(NET, tmp_path / "id.key", pid_file=pids)  # same identity: works only once they are ended
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans)
        mine = [psutil.Process(e["pid"]) for e in json.loads(pids.read_text())]
        assert {p.pid for p in mine}.isdisjoint(p.pid for p in orphans)
    finally:
        stop_dht(dht, pids)
    assert not pids.exists()
    _, alive = psutil.wait_procs(mine, timeout=10)
    assert not alive
    assert end_orphaned_dht(pids) == 0  # no file: nothing to do


def test_scores_of_1000_experts_are_paged_and_read_back_whole(swarm):
    record = ScoresRecord(round=3, updated_at=time.time(), experts=verdicts(1000))
    index, pages = records.scores_pages(record)
    assert index.pages == len(pages) > 1
    assert all(records.value_size(records.to_value(p)) <= records.PAGE_BYTES for p in pages)
    assert swarm["ra"].publish_scores(record)
    entry = swarm["rb"].scores()  # a node reads the coordinator's pages through the one read helper
    assert entry is not None and entry.owner == swarm["ra"].public_key
    assert entry.record == record and list(entry.record.experts) == list(record.experts)
    assert swarm["a"].is_alive() and swarm["b"].is_alive()

    # a smaller record replaces it: pages of the old one left in the DHT are not mixed in
    smaller = ScoresRecord(round=4, updated_at=time.time(), experts=dict(list(verdicts(5).items())))
    assert swarm["ra"].publish_scores(smaller)
    assert swarm["rb"].scores().record == smaller


def test_only_the_coordinator_writes_scores_pages(swarm):
    rb = swarm["rb"]
    page = records.ScoresPage(round=99, updated_at=1.0, page=0, experts={})
    # under its own key: refused by the peers that know the coordinator key
    assert not records.store_value(swarm["b"], records.scores_page_key(NET, 0), rb.owner, records.to_value(page), 60)
    assert not rb.publish_scores(ScoresRecord(round=99, updated_at=1.0, experts={}))
    entry = rb.scores()
    assert entry is None or entry.record.round != 99


def test_requests_larger_than_the_dht_pipe_do_not_kill_the_dht_process(swarm):
    """hivemind read such requests from a non-blocking pipe and died mid-message (finding 5)."""
    a = swarm["a"]
    for i in range(3):  # bare calls: our own store_value refuses values this large
        assert records.call_dht(a, "store", 30.0, key=f"umm.{NET}.raw.{i}", value=b"x" * 300_000,
                                expiration_time=records.dht_time() + 60)
        assert a.is_alive()
    assert records.call_dht(a, "get", 30.0, key=f"umm.{NET}.raw.2", latest=True).value == b"x" * 300_000


def test_values_over_the_record_size_limit_are_refused_before_sending(swarm):
    rb = swarm["rb"]
    with pytest.raises(RecordError, match="limit"):
        records.store_value(swarm["b"], records.providers_key(NET, "a" * 64), rb.owner,
                            {"blob": "y" * (records.MAX_VALUE_BYTES + 1)}, ttl=60)
    with pytest.raises(RecordError):
        records.scores_pages(ScoresRecord(round=1, updated_at=1.0, experts=verdicts(1000)), page_bytes=300)


def test_scores_past_the_last_page_are_left_out_when_publishing():
    record = ScoresRecord(round=1, updated_at=1.0, experts=verdicts(1000))
    with pytest.raises(RecordError, match="pages"):
        records.scores_pages(record, page_bytes=1024)
    index, pages = records.scores_pages(record, page_bytes=1024, drop_overflow=True)
    assert index.pages == len(pages) == records.MAX_SCORE_PAGES
    kept = [h for p in pages for h in p.experts]
    assert kept == list(record.experts)[: len(kept)]  # the first (most important) verdicts are kept


def _stopped_dht_gives_typed_errors(tmp_path) -> None:
    key = keys.load_or_create_key(tmp_path / "c.key")
    pub = keys.public_key_bytes(key)
    dht = start_dht(NET, tmp_path / "c.key", coordinator_public_key=pub)
    recs = NetworkRecords(dht, NET, key, pub, timeout=2.0)
    try:
        assert NetworkRecords(dht, NET, key, pub).experts() == {}  # it answers (default timeout: load)
        os.kill(dht.pid, signal.SIGSTOP)  # alive, but answers nothing
        with pytest.raises(DHTUnavailableError, match="no answer"):
            recs.experts()
        with pytest.raises(DHTUnavailableError):
            recs.publish_scores(ScoresRecord(round=1, updated_at=1.0, experts=verdicts(300)))
        for _ in range(3):  # requests pile up in the pipe; each caller still gets its error
            with pytest.raises(DHTUnavailableError):
                recs.scores()
        with pytest.raises(DHTUnavailableError):
            visible_maddrs(dht, timeout=1.0)
        assert str(dht.peer_id) == keys.peer_id_of(tmp_path / "c.key")  # cached at start: no call
    finally:
        stop_dht(dht, timeout=3.0)  # killed: it would never answer a shutdown request
    assert not dht.is_alive()
    with pytest.raises(DHTUnavailableError, match="not running"):
        recs.merged()


def test_a_stopped_dht_process_gives_typed_errors_not_a_hang(tmp_path):
    """Run in a fresh interpreter: killing a DHT process that has requests in flight can leave a
    partial message in hivemind's process-wide result pipe (shared by every DHT this process
    forked), after which later DHT starts in the same process never see their ready signal."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_stopped_dht_gives_typed_errors, args=(tmp_path,))
    proc.start()
    proc.join(300)
    if proc.is_alive():
        proc.kill()
        proc.join(10)
        pytest.fail("the stopped-DHT check did not finish within 300 s")
    assert proc.exitcode == 0, f"the stopped-DHT check failed in its own process (exit code {proc.exitcode}); see its output"
