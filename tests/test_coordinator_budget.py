"""A Sybil flood of expert records cannot make a round long: the fetch set is bounded per round,
per contributor key and per address, failed fetches back off, and the round completes."""

from __future__ import annotations

import hashlib
import time

from coordinator.config import parse_config
from coordinator.db import StateDB
from coordinator.round import (
    FetchCandidate,
    RoundContext,
    RoundRunner,
    fetch_wait,
    select_fetches,
)
from umm.net.records import Entry, ExpertRecord, scores_pages
from umm.net.store import ModelStore


def h(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def announcement(i: int | str, address: str, self_score: float) -> ExpertRecord:
    return ExpertRecord(name=f"expert-{i}", domains=["math"], architecture="llama:x", tokenizer="tok:y",
                        num_parameters=1000, manifest_hash=h(i), total_bytes=4096, address=address,
                        self_scores={"synth-math": self_score}, base_model=None, software_version="0.1.0")


class FloodedRecords:
    """The DHT as a flooded network shows it: ``n`` forged records on a few addresses, one honest."""

    def __init__(self, n: int, ports: list[int], honest_port: int):
        exp = time.time() + 600
        self.entries = {f"sybil-{i}".encode(): Entry(f"sybil-{i}".encode(),
                                                     announcement(i, f"127.0.0.1:{ports[i % len(ports)]}", 1.0), exp)
                        for i in range(n)}
        self.entries[b"honest"] = Entry(b"honest", announcement("honest", f"127.0.0.1:{honest_port}", 0.3), exp)
        self.published = []

    def experts(self):
        return dict(self.entries)

    def providers(self, manifest_hash):
        return {}

    def publish_scores(self, record, ttl):
        scores_pages(record)  # what the real NetworkRecords stores: it must fit the DHT's pages
        self.published.append(record)
        return True


def closed_ports(n: int) -> list[int]:
    """Ports on 127.0.0.1 where nothing listens (bound, then released)."""
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def runner(tmp_path, records, **settings) -> RoundRunner:
    cfg = parse_config({"network": "budget", "data_dir": str(tmp_path / "coord"), "merge": False,
                        "tasks": ["synth-math"], "fetch_retries": 1, "fetch_timeout": 2.0, **settings})
    cfg.data_dir.mkdir(parents=True)
    ctx = RoundContext(cfg, StateDB(cfg.data_dir / "state.db"), ModelStore(cfg.data_dir), records, "127.0.0.1:1")
    return RoundRunner(ctx)


def attempted(run: RoundRunner, number: int) -> set[str]:
    result = run.db.step(number, "fetch").result
    return set(result.fetched) | set(result.failed) | set(result.rejected)


def test_a_flood_of_300_forged_records_is_fetched_within_the_budget_and_the_round_completes(tmp_path):
    *ports, honest_port = closed_ports(4)
    records = FloodedRecords(300, ports, honest_port)
    run = runner(tmp_path, records, max_new_experts_per_round=8, max_new_experts_per_address=1)

    row = run.run()
    assert row.state == "verified", row.reason
    first = attempted(run, 1)
    # one per address: the three flooded addresses cost one fetch each, and the honest expert,
    # announced at its own address, is fetched in the first round despite its lower self-report
    assert len(first) == 4 and h("honest") in first
    assert len({run.db.expert(x).address for x in first}) == 4
    assert len(run.db.step(1, "discover").result.experts) == 301
    published = records.published[-1]
    assert published.round == 1 and set(published.experts) == first  # verdicts only for what was tried

    row = run.run()  # round 2: the first failures are retried once, other records wait their turn
    assert row.state == "verified" and row.number == 2
    assert len(attempted(run, 2)) == 4

    # with a wider per-address cap the per-round budget is what bounds the round
    wide = runner(tmp_path / "wide", FloodedRecords(300, ports, honest_port), max_new_experts_per_round=8,
                  max_new_experts_per_address=300)
    assert wide.run().state == "verified" and len(attempted(wide, 1)) == 8


def candidate(i: int, *, owner: str | None = None, address: str | None = None, score: float = 0.5,
              seen: float = 0.0, attempts: int = 0, last: float = 0.0, in_store: bool = False) -> FetchCandidate:
    return FetchCandidate(h(i), owner or f"k{i}", address or f"10.0.0.1:{1000 + i}", score, seen, attempts, last,
                          in_store)


def config(**over):
    return parse_config({"tasks": ["synth-math"], **over})


def test_selection_caps_orders_and_backs_off():
    cfg = config(max_new_experts_per_round=3, max_new_experts_per_owner=1, max_new_experts_per_address=2,
                 fetch_backoff=100.0, fetch_backoff_max=1000.0)
    now = 10_000.0
    # per owner and per address
    same_owner = [candidate(i, owner="one", score=1.0) for i in range(5)] + [candidate(9)]
    chosen = select_fetches(cfg, same_owner, now)
    assert len(chosen) == 2 and chosen[1] == h(9) and chosen[0] in {h(i) for i in range(5)}
    same_address = [candidate(i, address="10.0.0.9:1") for i in range(5)]
    assert len(select_fetches(cfg, same_address, now)) == 2
    many_ports = [candidate(i, address=f"10.0.0.9:{2000 + i}") for i in range(5)]
    assert len(select_fetches(cfg, many_ports, now)) == 3  # no host cap by default: the budget bounds it
    assert len(select_fetches(config(max_new_experts_per_host=1), many_ports, now)) == 1
    # order: fewer failures, then higher self-report, then newer
    mixed = [candidate(1, score=0.1, seen=5.0), candidate(2, score=0.9), candidate(3, score=0.1, seen=9.0),
             candidate(4, score=1.0, attempts=1, last=now - 1)]
    assert select_fetches(cfg, mixed, now) == [h(2), h(3), h(1)]
    # experts already in the store cost nothing and are always taken
    stored = [candidate(i, in_store=True) for i in range(5)] + [candidate(7)]
    assert select_fetches(cfg, stored, now) == [h(i) for i in range(5)] + [h(7)]


def test_failed_fetches_back_off_exponentially():
    cfg = config(fetch_backoff=100.0, fetch_backoff_max=1000.0)
    assert [fetch_wait(cfg, a) for a in range(6)] == [0.0, 0.0, 100.0, 300.0, 700.0, 1000.0]
    now = 10_000.0
    assert select_fetches(cfg, [candidate(1, attempts=1, last=now)], now) == [h(1)]  # a blip: next round
    assert select_fetches(cfg, [candidate(1, attempts=3, last=now - 299)], now) == []
    assert select_fetches(cfg, [candidate(1, attempts=3, last=now - 300)], now) == [h(1)]
    assert select_fetches(cfg, [candidate(1, attempts=99, last=now - 999)], now) == []
