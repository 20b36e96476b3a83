"""Start-up of a umm network: N ``umm-node join`` processes until a DHT reader sees all N experts.

    python bench/bench_network.py                     # 16 nodes, the cached full expert suite
    python bench/bench_network.py --nodes 4 --variant small

The bench process starts a DHT peer of its own (the reader: what a coordinator does on start-up)
and then all N node processes at once, bootstrapped from it; node ``i`` serves the expert of
domain ``i mod (math, code, list)`` exactly as ``umm net local`` (its process helpers are reused).
Each node checks its model (admission), hashes it, starts its DHT peer and gRPC server and
announces a signed expert record. Printed:

- time from starting the processes until the reader has 1, N/2 and N expert records, and until
  every node wrote its ready-file;
- per node: RSS of the node process, and RSS/PSS of its process group (the node, hivemind's DHT
  process, the libp2p daemon; PSS splits shared pages, so its sum is honest);
- DHT get latency of the experts key (all N records) from the reader: median / p90 / max;
- the size of one expert record (msgpack, as stored) and of the whole experts key.

Load average is printed with the figures: on a shared 2-core machine N processes that import
torch at once are CPU-bound, so the start-up time is mostly Python start-up and model hashing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

from umm.net.local import MARKER, Proc, child_env, node_experts, node_join_command


def group_memory(pid: int) -> tuple[int, int, int]:
    """(RSS of ``pid``, RSS summed over its session, PSS summed over its session) in bytes."""
    try:
        main = psutil.Process(pid)
        sid = os.getsid(pid)
        rss_main = main.memory_info().rss
    except (psutil.Error, ProcessLookupError):
        return 0, 0, 0
    rss = pss = 0
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) != sid:
                continue
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return rss_main, rss, pss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--variant", default="full", help="expert suite the nodes serve (must be built)")
    ap.add_argument("--experts-dir", type=Path, default=None)
    ap.add_argument("--gets", type=int, default=30, help="DHT gets timed once every record is there")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for all records")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ns = ap.parse_args()

    from hivemind.utils.serializer import MSGPackSerializer

    from umm.experts.build import load_suite
    from umm.net.dht import start_dht, visible_maddrs
    from umm.net.keys import load_or_create_key, public_key_bytes, public_key_text
    from umm.net.records import NetworkRecords, experts_key, to_value

    suite = load_suite(ns.variant, ns.experts_dir)
    experts = node_experts(suite, ns.nodes)
    work = Path(tempfile.mkdtemp(prefix="umm-bench-network-", dir=ns.workdir))
    (work / MARKER).write_text("bench_network scratch\n")
    network = "umm-bench"
    coord_key = load_or_create_key(work / "coordinator.key")
    (work / "coordinator.pub").write_text(public_key_text(coord_key) + "\n")
    reader_dht = start_dht(network, work / "reader.key", coordinator_public_key=public_key_bytes(coord_key))
    records = NetworkRecords(reader_dht, network, load_or_create_key(work / "reader.key"), public_key_bytes(coord_key))
    bootstrap = visible_maddrs(reader_dht)
    load_before = os.getloadavg()
    env = child_env()
    procs: list[Proc] = []
    try:
        t0 = time.monotonic()
        for i, expert in enumerate(experts):
            name = f"node-{i}-{expert}"
            ready_file = work / "ready" / f"{name}.json"
            cmd = node_join_command(suite, expert, name=name, network=network, data_dir=work / f"node-{i}",
                                    coordinator_key=work / "coordinator.pub", refresh_period=60,
                                    initial_peers=bootstrap, ready_file=ready_file)
            procs.append(Proc(name, cmd, work / "logs" / f"{name}.log", env, ready_file=ready_file))
        t_spawned = time.monotonic() - t0

        milestones: dict[int, float] = {}
        ready: dict[str, float] = {}
        seen = 0
        while seen < ns.nodes:
            now = time.monotonic() - t0
            for p in procs:
                if p.name not in ready and p.ready() is not None:
                    ready[p.name] = now
                if not p.alive():
                    raise SystemExit(f"{p.name} exited with code {p.popen.returncode}:\n{p.tail()}")
            seen = len(records.experts())
            now = time.monotonic() - t0
            for m in (1, max(1, ns.nodes // 2), ns.nodes):
                if seen >= m and m not in milestones:
                    milestones[m] = now
            if now > ns.timeout:
                raise SystemExit(f"only {seen} of {ns.nodes} expert records after {ns.timeout:.0f} s")
            time.sleep(0.25)
        load_at_all = os.getloadavg()
        while len(ready) < ns.nodes and time.monotonic() - t0 < ns.timeout:
            for p in procs:
                if p.name not in ready and p.ready() is not None:
                    ready[p.name] = time.monotonic() - t0
            time.sleep(0.25)

        time.sleep(2.0)  # let the start-up burst settle before timing gets
        lat = []
        for _ in range(ns.gets):
            g0 = time.perf_counter()
            got = records.experts()
            lat.append(time.perf_counter() - g0)
            if len(got) != ns.nodes:
                print(f"warning: a get returned {len(got)} of {ns.nodes} records")
        one = next(iter(got.values())).record
        one_bytes = len(MSGPackSerializer.dumps(to_value(one)))
        found = reader_dht.get(experts_key(network), latest=True)
        whole_bytes = len(MSGPackSerializer.dumps({k: (v.value, v.expiration_time) for k, v in found.value.items()}))
        mem = [group_memory(p.popen.pid) for p in procs]
        load_end = os.getloadavg()

        mib = 1 << 20
        lat.sort()
        print(f"{ns.nodes} node processes (suite {ns.variant!r}: {', '.join(sorted(set(experts)))}), "
              f"{os.cpu_count()} CPU cores")
        print(f"load average (1/5/15 min): before {'/'.join(f'{x:.1f}' for x in load_before)}, "
              f"when all records were in {'/'.join(f'{x:.1f}' for x in load_at_all)}, "
              f"end {'/'.join(f'{x:.1f}' for x in load_end)}")
        print(f"  processes spawned in                        {t_spawned:6.2f} s")
        for m, t in sorted(milestones.items()):
            print(f"  reader sees {m:2d} expert record(s) after       {t:6.1f} s")
        if ready:
            print(f"  nodes ready (wrote their ready-files): first {min(ready.values()):.1f} s, "
                  f"median {statistics.median(ready.values()):.1f} s, last {max(ready.values()):.1f} s "
                  f"({len(ready)} of {ns.nodes})")
        print(f"  DHT get of the experts key ({ns.nodes} records), {ns.gets} gets: median "
              f"{statistics.median(lat) * 1e3:.1f} ms, p90 {lat[int(0.9 * (len(lat) - 1))] * 1e3:.1f} ms, "
              f"max {lat[-1] * 1e3:.1f} ms")
        print(f"  expert record: {one_bytes} B (msgpack value); experts key with {len(found.value)} entries: "
              f"{whole_bytes / 1024:.1f} KiB (values + owner markers + expirations)")
        main_rss = [m[0] / mib for m in mem]
        grp_rss = [m[1] / mib for m in mem]
        grp_pss = [m[2] / mib for m in mem]
        print(f"  per node, MiB (median / max): node process RSS {statistics.median(main_rss):.0f} / {max(main_rss):.0f}; "
              f"with its DHT process + p2p daemon: RSS {statistics.median(grp_rss):.0f} / {max(grp_rss):.0f}, "
              f"PSS {statistics.median(grp_pss):.0f} / {max(grp_pss):.0f}")
        print(f"  all {ns.nodes} nodes together: PSS {sum(grp_pss) / 1024:.2f} GiB")
        return 0
    finally:
        for p in procs:
            p.terminate()
        deadline = time.monotonic() + 30
        for p in procs:
            p.finish(deadline - time.monotonic())
        reader_dht.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
