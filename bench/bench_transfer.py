"""Transfer speed: a model downloaded over gRPC on loopback vs. reading the same files locally.

    python bench/bench_transfer.py                  # ~1 GB model, 4 shards
    python bench/bench_transfer.py --size-mb 256 --repeat 1

The model folder holds random bytes in ``--files`` shards plus a config.json (the transfer does
not look inside files). The provider runs in its own process, like a real peer. Each figure is
taken twice, with the model's files in the page cache (warm: the upper bound of a local read on
this machine) and evicted from it first with ``posix_fadvise(DONTNEED)`` (cold-ish: read from
the disk, which is what a peer serving a model it has not touched lately does):

- local read + sha256, one file after another (what verifying a folder costs);
- local read + sha256 with ``--parallel`` threads (the same parallelism as the download);
- disk: write the same number of bytes into ``--parallel`` files and fsync them (no read, no
  hash): the ceiling of any download that must reach the disk before it enters the store;
- download: gRPC stream, sha256 while streaming, write to the partial folder (``fdatasync`` in
  the background every 64 MiB per file), fsync, rename into the store; the provider's files
  warm or cold as the local read's. Ratio = download MB/s / local MB/s, same cache state (goal:
  >= 0.5 of the sequential figure); the download's fraction of the disk ceiling is printed too.

CPU seconds per GB (user + system, all threads) are printed too: on a shared machine they are
steadier than wall-clock rates, and they show where the time goes (client: sha256 + gRPC
receive + writes; server: reading and sending). The 1-minute load average is printed with every
figure (the mean over the repeats, taken before each measurement).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from umm.checkpoints.manifest import build_manifest, sha256_file


def make_model(folder: Path, size_mb: int, files: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    per_file = size_mb * (1 << 20) // files
    block = 16 << 20
    for i in range(files):
        with open(folder / f"model-{i + 1:05d}-of-{files:05d}.safetensors", "wb") as fh:
            left = per_file
            while left:
                n = min(block, left)
                fh.write(os.urandom(n))
                left -= n
            os.fsync(fh.fileno())  # clean pages: evict() can drop them
    (folder / "config.json").write_text(json.dumps({"model_type": "bench", "size_mb": size_mb}))


def serve(folder: str, chunk_size: int, conn) -> None:
    from umm.net.server import CheckpointServer, CheckpointServicer

    servicer = CheckpointServicer(chunk_size=chunk_size)
    servicer.register_folder(folder)
    server = CheckpointServer(servicer, max_workers=16)
    conn.send(server.address)
    while conn.recv() == "cpu":  # until "stop"
        conn.send(cpu_seconds())
    server.stop(grace=None)


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def server_cpu(conn) -> float:
    conn.send("cpu")
    return conn.recv()


def evict(folder: Path, names: list[str]) -> None:
    """Drop the files from the page cache (they were fsynced, so their pages are clean)."""
    for n in names:
        fd = os.open(folder / n, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def local_read(folder: Path, names: list[str], parallel: int, cold: bool) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, load average before) to read and sha256 every file."""
    if cold:
        evict(folder, names)
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(lambda n: sha256_file(folder / n), names))
    return time.perf_counter() - t0, cpu_seconds() - c0, load


def disk_write(folder: Path, sizes: list[int], parallel: int) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, load average before) to write ``sizes`` bytes into files and fsync them
    (``fdatasync`` in the background every 64 MiB per file, as the download does)."""
    from umm.checkpoints.writer import DEFAULT_SYNC_EVERY, BackgroundSync

    folder.mkdir()
    block = os.urandom(4 << 20)

    def write(i: int) -> None:
        fd = os.open(folder / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        flusher = BackgroundSync(DEFAULT_SYNC_EVERY)
        try:
            left = sizes[i]
            while left:
                n = os.write(fd, memoryview(block)[: min(left, len(block))])
                flusher.wrote(fd, n)
                left -= n
            flusher.stop()
            os.fsync(fd)
        finally:
            os.close(fd)

    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(write, range(len(sizes))))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    shutil.rmtree(folder)
    return wall, cpu, load


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=4, help="files downloaded (and hashed locally) at once")
    ap.add_argument("--chunk-kib", type=int, default=1024, help="server chunk size")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ns = ap.parse_args()

    from umm.net.store import ModelStore
    from umm.net.transfer import download

    work = Path(tempfile.mkdtemp(prefix="umm-bench-transfer-", dir=ns.workdir))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = None
    try:
        src = work / "model"
        t0 = time.perf_counter()
        make_model(src, ns.size_mb, ns.files)
        manifest = build_manifest(src)
        total = manifest.total_bytes
        names = [e.path for e in manifest.files]
        print(f"model: {total / 1e6:.0f} MB in {len(names)} files, made and hashed in {time.perf_counter() - t0:.1f} s")
        proc = ctx.Process(target=serve, args=(str(src), ns.chunk_kib << 10, child), daemon=True)
        proc.start()
        address = parent.recv()

        runs: dict[tuple[str, bool], list[tuple[float, ...]]] = {}
        for r in range(ns.repeat):
            for cold in (False, True):
                runs.setdefault(("seq", cold), []).append(local_read(src, names, 1, cold))
                runs.setdefault(("par", cold), []).append(local_read(src, names, ns.parallel, cold))
                store = ModelStore(work / f"dest-{r}")
                if cold:
                    evict(src, names)
                else:
                    local_read(src, names, ns.parallel, False)  # the provider's files in the page cache
                load = os.getloadavg()[0]
                s0, t0, c0 = server_cpu(parent), time.perf_counter(), cpu_seconds()
                path = download(manifest.hash, [address], store, max_bytes=total, parallel_files=ns.parallel,
                                progress=False)
                wall, client = time.perf_counter() - t0, cpu_seconds() - c0
                runs.setdefault(("net", cold), []).append((wall, client, load, server_cpu(parent) - s0))
                assert path == store.path(manifest.hash)
                shutil.rmtree(work / f"dest-{r}")
        for _ in range(ns.repeat):  # after the downloads: the disk's work on freed blocks must not slow them
            runs.setdefault(("disk", False), []).append(
                disk_write(work / "disk", [e.size for e in manifest.files], ns.parallel))
        runs[("disk", True)] = runs[("disk", False)]
        gb = total / 1e9

        def med(kind: str, cold: bool, i: int) -> float:
            return statistics.median(run[i] for run in runs[(kind, cold)])

        def load(kind: str, cold: bool) -> str:
            return f"{statistics.mean(run[2] for run in runs[(kind, cold)]):5.1f}"

        print(f"cpu cores: {os.cpu_count()}, repeats: {ns.repeat} (median), {ns.parallel} files at once, "
              f"{ns.chunk_kib} KiB chunks")
        print(f"  {'':<52} {'MB/s':>8} {'CPU s/GB':>9} {'load':>5}")
        print(f"  {'disk: write + fsync, no read or hash (ceiling)':<52} {gb * 1e3 / med('disk', False, 0):8.0f} "
              f"{med('disk', False, 1) / gb:9.2f} {load('disk', False)}")
        for cold in (False, True):
            state = "cold-ish (evicted)" if cold else "warm page cache"
            print(f"  {state}")
            print(f"  {'  local read + sha256, sequential':<52} {gb * 1e3 / med('seq', cold, 0):8.0f} "
                  f"{med('seq', cold, 1) / gb:9.2f} {load('seq', cold)}")
            print(f"  {f'  local read + sha256, {ns.parallel} threads':<52} {gb * 1e3 / med('par', cold, 0):8.0f} "
                  f"{med('par', cold, 1) / gb:9.2f} {load('par', cold)}")
            print(f"  {'  gRPC download (+ sha256, write, fsync): client':<52} {gb * 1e3 / med('net', cold, 0):8.0f} "
                  f"{med('net', cold, 1) / gb:9.2f} {load('net', cold)}")
            print(f"  {'    (server process)':<52} {'':>8} {med('net', cold, 3) / gb:9.2f}")
            print(f"    ratio download / local sequential: {med('seq', cold, 0) / med('net', cold, 0):.2f}, "
                  f"/ local {ns.parallel} threads: {med('par', cold, 0) / med('net', cold, 0):.2f}, "
                  f"/ disk ceiling: {med('disk', cold, 0) / med('net', cold, 0):.2f}  "
                  f"(CPU: client {med('net', cold, 1) / med('seq', cold, 1):.2f}x, client + server "
                  f"{(med('net', cold, 1) + med('net', cold, 3)) / med('seq', cold, 1):.2f}x the local read)")
        return 0
    finally:
        if proc is not None:
            parent.send("stop")
            proc.join(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
