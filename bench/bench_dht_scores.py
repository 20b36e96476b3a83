"""Publishing and reading the coordinator's scores record (paged) for N experts on 127.0.0.1.

    python bench/bench_dht_scores.py                      # 250, 1000 and 2000 experts, 3 repeats
    python bench/bench_dht_scores.py --experts 1000 --repeat 5

Two DHT peers: the coordinator (writes) and a node (reads, through ``NetworkRecords.scores``).
Each expert gets a verdict shaped like the coordinator's: a third admitted with two task scores
and ranks, the rest rejected or not fetched with a ~300-character reason. Printed per N: bytes of
the whole record (msgpack), pages and the largest page, and the median / max wall time of
``publish_scores`` and of ``scores()`` over the repeats, and whether both DHT processes are alive.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path


def scores_record(n: int):
    from umm.net.records import ExpertVerdict, ScoresRecord

    experts = {}
    for i in range(n):
        key = hashlib.sha256(f"expert {i}".encode()).hexdigest()
        admitted = i % 3 == 0
        experts[key] = ExpertVerdict(
            admitted=admitted,
            reason="admitted" if admitted else f"not fetched yet: 127.0.0.1:{10000 + i} unreachable; " + "r" * 260,
            scores={"synth-math": (i % 97) / 97, "synth-code": (i % 89) / 89} if admitted else {},
            ranks={"math": i // 3 + 1, "code": i // 3 + 1} if admitted else {},
        )
    return ScoresRecord(round=1, updated_at=time.time(), experts=experts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, nargs="+", default=[250, 1000, 2000])
    ap.add_argument("--repeat", type=int, default=3)
    ns = ap.parse_args()

    from umm.net import keys
    from umm.net.dht import start_dht, stop_dht, visible_maddrs
    from umm.net.records import NetworkRecords, scores_pages, to_value, value_size

    work = Path(tempfile.mkdtemp(prefix="umm-bench-scores-"))
    coord_key = keys.load_or_create_key(work / "coord.key")
    pub = keys.public_key_bytes(coord_key)
    writer = start_dht("bench", work / "coord.key", coordinator_public_key=pub)
    reader = start_dht("bench", work / "node.key", initial_peers=visible_maddrs(writer), coordinator_public_key=pub)
    try:
        w = NetworkRecords(writer, "bench", coord_key, pub)
        r = NetworkRecords(reader, "bench", keys.load_key(work / "node.key"), pub)
        print(f"{'experts':>8} {'record KiB':>10} {'pages':>5} {'max page KiB':>12} "
              f"{'publish s (med/max)':>20} {'read s (med/max)':>17}  alive")
        for n in ns.experts:
            record = scores_record(n)
            _, pages = scores_pages(record, drop_overflow=True)
            pub_t, read_t = [], []
            for _ in range(ns.repeat):
                t0 = time.perf_counter()
                ok = w.publish_scores(record)
                pub_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                got = r.scores()
                read_t.append(time.perf_counter() - t0)
                if not ok or got is None or len(got.record.experts) != sum(len(p.experts) for p in pages):
                    print(f"  warning: publish stored={ok}, read {0 if got is None else len(got.record.experts)}")
            print(f"{n:8d} {value_size(to_value(record)) / 1024:10.0f} {len(pages):5d} "
                  f"{max(value_size(to_value(p)) for p in pages) / 1024:12.1f} "
                  f"{statistics.median(pub_t):9.2f} / {max(pub_t):6.2f}  {statistics.median(read_t):7.2f} / "
                  f"{max(read_t):6.2f}  {writer.is_alive() and reader.is_alive()}")
    finally:
        stop_dht(reader)
        stop_dht(writer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
