"""The coordinator on a real loopback network: hivemind DHT peers + gRPC checkpoint servers.

Six contributors announce experts: two good ones (one of them offline in round 1), a
pickle-only model, a model with a NaN weight, one over the size limit, and one whose provider
serves bytes that do not match its manifest. The coordinator must admit and rank the good ones
on its own scores, reject the others with reasons visible in the leaderboard, merge in a worker
process, publish the merged model and serve it; a SIGKILLed coordinator resumes its round.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml
from subprocs import ctrl_c_default

from coordinator.app import STATE_DB, Coordinator
from coordinator.config import parse_config
from coordinator.db import StateDB
from coordinator.round import benchmark_key
from umm.checkpoints.manifest import build_manifest
from umm.net import keys
from umm.net.dht import DHT_PIDS, end_orphaned_dht, start_dht, visible_maddrs
from umm.net.records import ExpertRecord, NetworkRecords
from umm.net.server import CheckpointServer, CheckpointServicer

NET = "coordtest"
MAX_BYTES = 1_000_000  # the tiny models are ~0.6 MB; the oversize one ~1.9 MB
SETTINGS = {
    "network": NET, "tasks": ["synth-math"], "eval_limit": 2, "test_limit": 2, "max_new_tokens": 4,
    "eval_batch_size": 4, "max_model_bytes": MAX_BYTES, "fetch_retries": 1, "fetch_timeout": 5.0,
    "round_interval": 0.0, "refresh_period": 30.0, "evolve": {"budget": {"evaluations": 3}, "population": 2},
}


class Contributor:
    """A peer announcing one expert folder and serving it over gRPC."""

    def __init__(self, root: Path, name: str, folder: Path, coord_pub: bytes, initial_peers: list[str],
                 domains: list[str]):
        self.name, self.folder, self.domains = name, folder, domains
        self.key_path = root / f"{name}.key"
        self.dht = start_dht(NET, self.key_path, initial_peers=initial_peers, coordinator_public_key=coord_pub)
        self.records = NetworkRecords(self.dht, NET, keys.load_key(self.key_path), coord_pub)
        self.manifest = build_manifest(folder)
        self.server: CheckpointServer | None = None

    def serve(self) -> str:
        servicer = CheckpointServicer(chunk_size=64 << 10)
        servicer.register_folder(self.folder, self.manifest)
        self.server = CheckpointServer(servicer)
        return self.server.address

    def announce(self, address: str) -> None:
        from umm.checkpoints.fingerprint import fingerprint
        from umm.checkpoints.reader import Checkpoint

        try:
            with Checkpoint.open(self.folder) as ck:
                fp = fingerprint(ck)
            arch, tok, n = fp.architecture, fp.tokenizer or "", fp.num_parameters
        except Exception:  # the pickle-only folder has no readable weights; it claims anything
            arch, tok, n = "llama:claimed", "tok:claimed", 1000
        record = ExpertRecord(
            name=self.name, domains=self.domains, architecture=arch, tokenizer=tok, num_parameters=n,
            manifest_hash=self.manifest.hash, total_bytes=self.manifest.total_bytes, address=address,
            self_scores={"synth-math": 0.99}, base_model=None, software_version="test",
        )
        assert self.records.announce_expert(record, ttl=600)

    def ensure_serving(self) -> None:
        if self.server is None:
            self.announce(self.serve())

    def stop_serving(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None)
            self.server = None


def _write_pickle_only(src: Path, dst: Path) -> Path:
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    torch.save(state, dst / "pytorch_model.bin")  # written by the test only; the coordinator never unpickles
    return dst


def _write_nan(src: Path, dst: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    name = sorted(k for k in state if k.endswith("mlp.down_proj.weight"))[0]
    state[name] = state[name].clone()
    state[name][0, 0] = float("nan")
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def net(tiny_models, tmp_path_factory):
    """Contributors on a DHT that trusts the coordinator key ``coord.key``; nothing else running yet."""
    from umm.experts.random_models import make_random_llama

    root = tmp_path_factory.mktemp("coordnet")
    coord_key = root / "coord.key"
    coord_pub = keys.public_key_bytes(keys.load_or_create_key(coord_key))
    folders = {
        "math": (tiny_models["math"], ["math"]),
        "code": (tiny_models["code"], ["math"]),
        "pickle": (_write_pickle_only(tiny_models["math"], root / "pickle"), ["math"]),
        "nan": (_write_nan(tiny_models["code"], root / "nan"), ["math"]),
        "huge": (make_random_llama(root / "huge", seed=3, hidden_size=128), ["math"]),
        "corrupt": (make_random_llama(root / "corrupt", seed=4, base=tiny_models["base"]), ["math"]),
    }
    peers: dict[str, Contributor] = {}
    try:
        # every DHT (they fork) before any gRPC server in this process
        names = list(folders)
        peers[names[0]] = Contributor(root, names[0], folders[names[0]][0], coord_pub, [], folders[names[0]][1])
        first = visible_maddrs(peers[names[0]].dht)
        with ThreadPoolExecutor(len(names) - 1) as pool:  # joining peers start in parallel (~2x faster)
            futures = {n: pool.submit(Contributor, root, n, folders[n][0], coord_pub, first, folders[n][1])
                       for n in names[1:]}
            for n, f in futures.items():
                try:
                    peers[n] = f.result()
                except Exception:
                    continue
        assert set(peers) == set(names), "a contributor's DHT did not start"
        for name, c in peers.items():
            if name == "code":  # offline in round 1: announced, but nobody answers at that address
                c.announce("127.0.0.1:9")
                continue
            c.announce(c.serve())
        # the corrupt provider: its file changes on disk after it was hashed (same size, other bytes,
        # same inode and mtime, so the server cannot tell: as a provider running modified code would)
        weights = peers["corrupt"].folder / "model.safetensors"
        st = weights.stat()
        data = bytearray(weights.read_bytes())
        data[-100] ^= 0xFF
        weights.write_bytes(bytes(data))
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        yield {"root": root, "peers": peers, "coord_key": coord_key, "coord_pub": coord_pub,
               "initial_peers": first}
    finally:
        for c in peers.values():
            c.stop_serving()
            c.dht.shutdown()


def _config(net, data_dir: Path, **over):
    return parse_config({**SETTINGS, "data_dir": str(data_dir), "key_path": str(net["coord_key"]),
                         "initial_peers": net["initial_peers"], **over})


def test_round_admits_ranks_and_rejects_with_reasons(net):
    """Round 1 verifies only (merge off); the offline expert is retried, not rejected."""
    from umm.net.status import fetch_status

    peers = net["peers"]
    cfg = _config(net, net["root"] / "coord-data", merge=False)
    with Coordinator(cfg) as coord:
        row = coord.run_round()
        assert row.state == "verified" and row.number == 1
        db = coord.db
        v = {name: db.verdict(c.manifest.hash) for name, c in peers.items()}
        assert v["math"].admitted and v["math"].reason == "admitted"
        assert v["code"] is None and db.fetch(peers["code"].manifest.hash).status == "failed"
        assert not v["pickle"].admitted and "safetensors" in v["pickle"].reason
        assert not v["nan"].admitted and "NaN" in v["nan"].reason
        assert "model.layers" in v["nan"].reason  # names the tensor
        assert not v["huge"].admitted and v["huge"].reason.startswith("too large")
        assert not v["corrupt"].admitted and "do not match the manifest" in v["corrupt"].reason
        # nothing unverified enters the store, and rejected bytes are dropped (the store is served)
        assert coord.store.list() == [peers["math"].manifest.hash]

        # self-reported 0.99 is shown to nobody as a score: ranks use the coordinator's evaluation
        math_hash = peers["math"].manifest.hash
        own = db.evaluations(benchmark_key(cfg, "search"))
        assert set(own) == {math_hash} and set(own[math_hash].scores) == {"synth-math"}
        scores = peers["code"].records.scores()  # a contributor reads the coordinator's signed record
        assert scores is not None and scores.record.round == 1
        verdicts = scores.record.experts
        assert verdicts[math_hash].admitted and verdicts[math_hash].ranks == {"math": 1}
        assert verdicts[math_hash].scores == own[math_hash].scores
        assert not verdicts[peers["nan"].manifest.hash].admitted
        assert "not fetched yet" in verdicts[peers["code"].manifest.hash].reason

        # the status service shows the leaderboard with the rejections and their reasons
        data = fetch_status(coord.status_address)
        assert data.status.experts_known == 6 and data.status.experts_admitted == 1
        ranked = [e for e in data.leaderboard if e.domain not in ("rejected", "pending")]
        assert {(e.domain, e.rank, e.name) for e in ranked} == {("math", 1, "math")}
        assert data.expert_names() == {math_hash: "math"}
        rejected = {e.manifest_hash: e.name for e in data.leaderboard if e.domain == "rejected"}
        assert len(rejected) == 4 and "too large" in rejected[peers["huge"].manifest.hash]
        assert data.rounds[0].state == "verified" and not data.rounds[0].HasField("comparison")  # nothing merged
        pending = [e for e in data.leaderboard if e.domain == "pending"]
        assert [e.manifest_hash for e in pending] == [peers["code"].manifest.hash]
        assert "retried next round" in pending[0].name

        config_path = net["root"] / "coord.yaml"  # `status --config` finds the running coordinator's address
        config_path.write_text(yaml.safe_dump({"network": NET, "data_dir": str(cfg.data_dir)}))
        proc = subprocess.run([sys.executable, "-m", "coordinator.cli", "status", "--config", str(config_path)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "250"})
        assert proc.returncode == 0, proc.stderr
        assert "Leaderboard" in proc.stdout and "rejected" in proc.stdout and "too large" in proc.stdout


def test_merge_round_runs_in_a_worker_publishes_and_serves(net, tmp_path):
    """Round 2 (same state): the offline expert came back; finished work is not redone."""
    from umm.net.status import fetch_status
    from umm.net.store import ModelStore
    from umm.net.transfer import download

    peers = net["peers"]
    peers["code"].ensure_serving()
    data_dir = net["root"] / "coord-data"
    before = StateDB(data_dir / STATE_DB)
    # the toy models score about 0 whatever is merged: margin -1 publishes any result (the gate is
    # tested in test_coordinator_jobs.py and test_combine_decision.py)
    cfg = _config(net, data_dir, merge=True, margin=-1.0)
    math_eval = before.evaluation(peers["math"].manifest.hash, benchmark_key(cfg, "search"))
    assert math_eval is not None
    with Coordinator(cfg) as coord:
        row = coord.run_round()
        assert row.number == 2 and row.state == "published", row.reason
        db = coord.db
        assert db.evaluation(peers["math"].manifest.hash, benchmark_key(cfg, "search")) == math_eval  # not re-evaluated
        assert db.verdict(peers["code"].manifest.hash).admitted
        job = db.round_job(2)
        assert job.status == "done" and job.kind == "combine" and job.pid != os.getpid()
        assert job.result.plan.stages == ["evolve"] and job.result.decision.published
        assert sorted(row.sources) == sorted([peers["math"].manifest.hash, peers["code"].manifest.hash])
        merged = row.merged_hash
        assert coord.store.has(merged) and set(row.scores) == {"synth-math"}

        record = peers["math"].records.merged()  # signed by the coordinator, read by a node
        assert record is not None and record.record.manifest_hash == merged
        assert record.record.address == coord.address and record.record.round == 2
        assert set(record.record.source_scores) == set(row.sources)
        providers = peers["math"].records.providers(merged)
        assert [e.record.address for e in providers.values()] == [coord.address]
        # a node fetches it from the coordinator, hash-checked
        path = download(merged, [record.record.address], ModelStore(tmp_path / "node"), max_bytes=10 * MAX_BYTES,
                        progress=False)
        assert build_manifest(path).hash == merged

        view = fetch_status(coord.status_address)
        board = view.leaderboard
        assert [(e.manifest_hash, e.merged) for e in board if e.domain == "merged"] == [(merged, True)]
        assert not [e for e in board if e.domain == "pending"]
        # the status service carries the round's comparison: the merged model's test scores beside its sources'
        comp = view.round(2).comparison
        assert comp.merged.manifest_hash == merged and dict(comp.merged.scores) == row.scores
        assert sorted(s.manifest_hash for s in comp.sources) == sorted(row.sources)
        assert comp.merged.objective == row.objective

        # the next round finds the same experts: no job is run again, the merged record stays
        row3 = coord.run_round()
        assert row3.state == "no_improvement" and "no new expert since round 2" in row3.reason
        assert db.step(3, "plan").result.previous == merged  # offered as a candidate, and the bar
        assert db.round_job(3) is None and peers["math"].records.merged().record.round == 2
        ranks = {(r.domain, r.rank) for r in db.latest_ranks()}
        assert ranks == {("math", 1), ("math", 2)}
    # a stopped coordinator no longer serves the model: its provider record is withdrawn
    assert peers["math"].records.providers(merged) == {}


def _running(entries: list[dict]) -> list[psutil.Process]:
    """The processes of a DHT pid file that still run (same pid and start time)."""
    out = []
    for e in entries:
        try:
            p = psutil.Process(e["pid"])
            if abs(p.create_time() - e["create_time"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def _wait_gone(entries: list[dict], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _running(entries) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _running(entries)


def test_ctrl_c_to_the_coordinators_group_withdraws_its_provider_record(net):
    """A restarted coordinator serves round 2's model again; Ctrl-C (SIGINT to its process group,
    as a terminal sends it) withdraws that provider record at once, and leaves no DHT process."""
    peers, data_dir = net["peers"], net["root"] / "coord-data"
    merged = StateDB(data_dir / STATE_DB).last_published_round().merged_hash
    config_path = net["root"] / "coord-ctrl-c.yaml"
    config_path.write_text(yaml.safe_dump({**SETTINGS, "data_dir": str(data_dir), "key_path": str(net["coord_key"]),
                                           "initial_peers": net["initial_peers"], "merge": True}))
    cmd = [sys.executable, "-m", "coordinator.cli", "run", "--config", str(config_path), "--rounds", "1", "--linger"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_default)
    try:
        lines = []
        for line in proc.stdout:  # the round finds nothing new to merge, then the coordinator lingers
            lines.append(line)
            if "serving until interrupted" in line:
                break
        assert proc.poll() is None, "".join(lines[-30:])
        reader = peers["math"].records
        deadline = time.monotonic() + 30
        while net["coord_pub"] not in reader.providers(merged) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert net["coord_pub"] in reader.providers(merged)
        entries = json.loads((data_dir / DHT_PIDS).read_text())

        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
        assert rc == 0, "".join(lines[-30:]) + proc.stdout.read()[-3000:]
        # withdrawn, not expiring (the record lives 2 x refresh_period = 60 s)
        deadline = time.monotonic() + 15
        while net["coord_pub"] in reader.providers(merged) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert net["coord_pub"] not in reader.providers(merged)
        assert reader.merged().record.manifest_hash == merged  # the merged-model record itself stays
        assert _wait_gone(entries, 15) and not (data_dir / DHT_PIDS).exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        end_orphaned_dht(data_dir / DHT_PIDS)


@pytest.mark.timeout(1200)
def test_sigkilled_coordinator_resumes_its_round(net, tmp_path):
    """SIGKILL in the middle of the evaluate step; the restart finishes the round, skipping done work."""
    net["peers"]["code"].ensure_serving()
    key = tmp_path / "other-coord.key"  # own identity (the first coordinator's peer id may linger)
    # each expert's evaluation is made to last seconds (many items, one per batch), so the poll
    # below reliably sees the state "one expert evaluated, the other in progress" even on a fast machine
    cfg = {**SETTINGS, "data_dir": str(tmp_path / "data"), "key_path": str(key), "merge": False,
           "initial_peers": net["initial_peers"], "eval_limit": 96, "max_new_tokens": 16,
           "eval_batch_size": 1}
    # the contributors trust another coordinator key, so this one's scores records are refused:
    # that is logged, and the round goes on
    config_path = tmp_path / "coordinator.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "coordinator.cli", "run", "--config", str(config_path), "--rounds", "1"]
    db_path = tmp_path / "data" / STATE_DB
    bench = benchmark_key(parse_config(cfg), "search")
    log = tmp_path / "first-run.log"  # a file, not a pipe nobody reads while it runs
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=fh)
    try:
        deadline = time.monotonic() + 400  # fetching and evaluating take minutes on a loaded machine
        first, watch = None, None
        while time.monotonic() < deadline and proc.poll() is None:
            if watch is None and db_path.exists():  # the coordinator created it
                watch = StateDB(db_path)
            if watch is not None:
                first = [(h, e.evaluated_at) for h, e in watch.evaluations(bench).items()]
            if first:
                break
            time.sleep(0.1)
        if watch is not None:
            watch.close()
        assert first and len(first) == 1, log.read_text()[-5000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    db = StateDB(db_path)
    assert db.round(1).state == "running" and db.step(1, "evaluate").status == "running"
    before = {s.name: s for s in db.steps(1)}

    # its DHT process and p2p daemon (recorded beside the state) follow it: none is left running
    # under its identity, or the restart would find the identity taken
    entries = json.loads((tmp_path / "data" / DHT_PIDS).read_text())
    assert len(entries) == 2 and _wait_gone(entries, 30)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        end_orphaned_dht(tmp_path / "data" / DHT_PIDS)
    assert done.returncode == 0, done.stderr[-3000:]
    r = db.round(1)
    assert r.state == "verified" and db.unfinished_round() is None and len(db.rounds()) == 1
    after = {s.name: s for s in db.steps(1)}
    for name in ("discover", "fetch", "admit"):  # finished before the kill: not run again
        assert after[name].attempts == 1 and after[name].finished_at == before[name].finished_at
    assert after["evaluate"].attempts == 2 and after["rank"].status == "done"
    evals = {h: e.evaluated_at for h, e in db.evaluations(bench).items()}
    assert len(evals) == 2 and evals[first[0][0]] == first[0][1]  # the first expert was not re-evaluated
    rejected = [v for v in db.verdicts().values() if not v.admitted]
    assert len(rejected) == 4
