"""The node on a real hivemind swarm on 127.0.0.1: admission first, announce, serve, follow merged models.

A "coordinator" in these tests is a plain DHT peer holding the coordinator key (NetworkRecords)
plus a CheckpointServer for the merged model it publishes.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from node.app import Node, NodeError
from node.config import NodeConfig, NodeConfigError
from umm.checkpoints.errors import NonFiniteTensorError, NotSafetensorsError
from umm.checkpoints.manifest import build_manifest
from umm.net import keys
from umm.net.dht import start_dht, visible_maddrs
from umm.net.records import MergedRecord, NetworkRecords

NET = "nodetest"


def wait_for(pred: Callable[[], object], timeout: float = 20.0, every: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    """The coordinator's DHT peer and its records (the first peer: nodes bootstrap from it)."""
    root = tmp_path_factory.mktemp("coord")
    key = keys.load_or_create_key(root / "coord.key")
    pub = keys.public_key_bytes(key)
    dht = start_dht(NET, root / "coord.key", coordinator_public_key=pub)
    try:
        yield {"dht": dht, "records": NetworkRecords(dht, NET, key, pub), "pub": pub,
               "peers": visible_maddrs(dht), "root": root}
    finally:
        dht.shutdown()


def node_config(model: Path, data_dir: Path, coordinator: dict, **kw) -> NodeConfig:
    return NodeConfig(model=model, domains=["math"], name=kw.pop("name", "math-expert"), network=kw.pop("network", NET),
                      data_dir=data_dir, initial_peers=coordinator["peers"],
                      coordinator_public_key=coordinator["pub"], show_progress=False, **kw)


@pytest.fixture(scope="module")
def node(tiny_models, tmp_path_factory, coordinator):
    n = Node(node_config(tiny_models["math"], tmp_path_factory.mktemp("node"), coordinator,
                         refresh_period=2.0, watch_period=0.5, self_scores={"gsm8k": 0.25}, base_model="tiny-base"))
    n.start()
    try:
        yield n
    finally:
        n.stop()


def test_bad_models_are_refused_before_anything_starts(tiny_models, tmp_path, coordinator):
    nan = tmp_path / "nan"
    shutil.copytree(tiny_models["code"], nan)
    tensors = load_file(nan / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, nan / "model.safetensors", metadata={"format": "pt"})
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_models["code"] / "config.json", pickled / "config.json")
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")

    for folder, error, match in ((nan, NonFiniteTensorError, name), (pickled, NotSafetensorsError, None)):
        data_dir = tmp_path / f"data-{folder.name}"
        n = Node(node_config(folder, data_dir, coordinator))
        with pytest.raises(error, match=match):
            n.start()
        assert n.dht is None and n.server is None  # nothing was started, so nothing announced
        assert not data_dir.exists()  # not even an identity key
    assert all(e.record.name != "math-expert" or e.record.manifest_hash != build_manifest(nan).hash
               for e in coordinator["records"].experts().values())


def test_config_refuses_a_public_address_without_announce_host(tiny_models, tmp_path):
    with pytest.raises(NodeConfigError, match="--announce-host"):
        NodeConfig(model=tiny_models["math"], domains=["math"], host="0.0.0.0", data_dir=tmp_path)
    with pytest.raises(NodeConfigError, match="--domain"):
        NodeConfig(model=tiny_models["math"], domains=[], data_dir=tmp_path)


def test_announced_record_and_download_by_another_peer(node, coordinator, tiny_models, tmp_path):
    from umm.net.store import ModelStore
    from umm.net.transfer import download

    info = node.info
    manifest = build_manifest(tiny_models["math"])
    entry = wait_for(lambda: coordinator["records"].experts().get(keys.public_key_bytes(
        keys.load_key(node.config.identity))))
    assert entry, "the coordinator never saw the node's expert record"
    rec = entry.record
    assert rec.name == "math-expert" and rec.domains == ["math"]
    assert rec.manifest_hash == manifest.hash == info.manifest_hash
    assert rec.total_bytes == manifest.total_bytes and rec.num_parameters > 0
    assert rec.address == info.grpc_address and rec.address.startswith("127.0.0.1:")
    assert rec.self_scores == {"gsm8k": 0.25} and rec.base_model == "tiny-base"
    assert rec.architecture and rec.tokenizer
    # a second node on the same data dir is refused (one dir per node)
    with pytest.raises(NodeError, match="another running node"):
        Node(node_config(tiny_models["math"], node.config.data_dir, coordinator)).start()

    store = ModelStore(tmp_path / "coord-store")
    path = download(rec.manifest_hash, [rec.address], store, max_bytes=10**9, progress=False)
    assert build_manifest(path).hash == manifest.hash
    for e in manifest.files:
        assert (path / e.path).read_bytes() == (tiny_models["math"] / e.path).read_bytes()


def merged_record(round_: int, folder: Path, address: str, sources: list[str]) -> MergedRecord:
    m = build_manifest(folder)
    return MergedRecord(
        round=round_, name=f"merged-r{round_}", manifest_hash=m.hash, total_bytes=m.total_bytes, address=address,
        sources=sources, method="ties", recipe_hash="a" * 64, scores={"gsm8k": 0.5},
        source_scores={s: {"gsm8k": 0.25} for s in sources}, published_at=time.time(),
    )


def test_node_fetches_and_serves_only_the_coordinators_merged_model(node, coordinator, tiny_models, tmp_path):
    from umm.net.server import CheckpointServer
    from umm.net.store import ModelStore
    from umm.net.transfer import download

    merged = tmp_path / "merged"
    shutil.copytree(tiny_models["code"], merged)
    forged = tmp_path / "forged"
    shutil.copytree(tiny_models["base"], forged)
    sources = [node.info.manifest_hash]
    forged_hash = build_manifest(forged).hash

    # A forger (a peer that does not enforce the coordinator key) publishes a merged record with
    # its own key, and serves the bytes: the node must never fetch them.
    forger_dht = start_dht(NET, tmp_path / "forger.key", initial_peers=coordinator["peers"])
    server = CheckpointServer(store=ModelStore(tmp_path / "coord-store"))
    try:
        server.servicer.register_folder(forged)
        server.servicer.register_folder(merged)
        forger = NetworkRecords(forger_dht, NET, keys.load_key(tmp_path / "forger.key"))
        forger.publish_merged(merged_record(5, forged, server.address, sources), ttl=30)
        time.sleep(4 * node.config.poll_period)
        assert node.watcher.current is None and not node.store.has(forged_hash)

        assert coordinator["records"].publish_merged(merged_record(1, merged, server.address, sources), ttl=30)
        assert wait_for(lambda: node.watcher.current is not None), node.watcher.last_error
        current = node.watcher.current
        assert current.round == 1 and current.manifest_hash == build_manifest(merged).hash
        assert node.store.has(current.manifest_hash) and not node.store.has(forged_hash)
        assert not any(node.store.partial_dir.glob(f"{current.manifest_hash}/*"))
        assert json.loads((node.store.path(current.manifest_hash) / "config.json").read_text()) == json.loads(
            (merged / "config.json").read_text())
        # the node announces itself as a provider and serves the bytes itself
        providers = wait_for(lambda: coordinator["records"].providers(current.manifest_hash))
        assert [e.record.address for e in providers.values()] == [node.info.grpc_address]
    finally:
        server.stop()
        forger_dht.shutdown()
    # the coordinator's server is gone: the node's copy alone is enough to fetch the merged model
    again = download(current.manifest_hash, [node.info.grpc_address], ModelStore(tmp_path / "third"),
                     max_bytes=10**9, progress=False)
    assert build_manifest(again).hash == current.manifest_hash


def test_status_command_shows_experts_and_merged(node, coordinator):
    from typer.testing import CliRunner

    from node.cli import app
    from umm.net.records import ExpertVerdict, ScoresRecord

    wait_for(lambda: node.watcher.current is not None, timeout=10)
    mine, gone = node.info.manifest_hash, "e" * 64
    verdicts = {
        mine: ExpertVerdict(admitted=True, reason="ok", scores={"gsm8k": 0.5}, ranks={"math": 1}),
        gone: ExpertVerdict(admitted=True, reason="ok", scores={"gsm8k": 0.9}, ranks={"math": 2}),
        "f" * 64: ExpertVerdict(admitted=False, reason="NaN in lm_head.weight", scores={}, ranks={}),
    }
    assert coordinator["records"].publish_scores(
        ScoresRecord(round=1, updated_at=time.time(), experts=verdicts), ttl=30)
    args = ["status", "--network", NET, "--coordinator-key", coordinator["pub"].decode()]
    for m in coordinator["peers"]:
        args += ["--initial-peers", m]
    result = CliRunner().invoke(app, args + ["--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [e["name"] for e in data["experts"]] == ["math-expert"]
    assert data["experts"][0]["address"] == node.info.grpc_address
    # the expert whose record is gone is not on the leaderboard; the rejected one is listed with its reason
    assert [(r["domain"], r["rank"], r["name"]) for r in data["leaderboard"]] == [("math", 1, "math-expert")]
    assert data["rejected"] == {"f" * 64: "NaN in lm_head.weight"}
    if node.watcher.current is not None:  # published by the previous test
        assert data["merged"]["round"] == 1 and node.info.grpc_address in data["merged"]["providers"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "math-expert" in result.output and "experts on 'nodetest'" in result.output
    assert "leaderboard (round 1)" in result.output and "NaN in lm_head.weight" in result.output


def test_clean_stop_withdraws_and_a_vanished_node_expires(tiny_models, tmp_path, coordinator):
    records = coordinator["records"]
    leaving = Node(node_config(tiny_models["code"], tmp_path / "leaving", coordinator, name="leaving",
                               refresh_period=1.0))
    crashed = Node(node_config(tiny_models["base"], tmp_path / "crashed", coordinator, name="crashed",
                               refresh_period=1.0))
    leaving.start()
    crashed.start()
    try:
        def names() -> set[str]:
            return {e.record.name for e in records.experts().values()}

        assert wait_for(lambda: {"leaving", "crashed"} <= names())
        time.sleep(2.5)  # longer than the 2 s TTL: only refreshing keeps the records
        assert {"leaving", "crashed"} <= names()
        leaving.stop()
        assert "leaving" not in names()  # withdrawn at once
        crashed.stop(withdraw=False)  # like a killed process: nothing is withdrawn
        assert wait_for(lambda: "crashed" not in names(), timeout=6.0), "the record did not expire"
    finally:
        leaving.stop()
        crashed.stop()


def test_a_node_stopped_mid_transfer_stores_nothing_then_resumes(tiny_models, tmp_path):
    """Stopping (or killing) a node during a merged-model download leaves only partial files; the
    next start resumes them and the model enters the store verified."""
    from umm.net.server import CheckpointServer, CheckpointServicer
    from umm.net.store import ModelStore

    class SlowServicer(CheckpointServicer):
        delay = 0.05

        def ReadFile(self, request, context):
            for chunk in super().ReadFile(request, context):
                time.sleep(self.delay)
                yield chunk

    key = keys.load_or_create_key(tmp_path / "coord.key")
    pub = keys.public_key_bytes(key)
    dht = start_dht("resume", tmp_path / "coord.key", coordinator_public_key=pub)
    servicer = SlowServicer(chunk_size=4096)
    server = CheckpointServer(servicer)
    merged = tmp_path / "merged"
    shutil.copytree(tiny_models["code"], merged)
    h = servicer.register_folder(merged)
    coordinator = {"peers": visible_maddrs(dht), "pub": pub}
    data_dir = tmp_path / "node"
    try:
        NetworkRecords(dht, "resume", key, pub).publish_merged(merged_record(3, merged, server.address, []), ttl=60)
        first = Node(node_config(tiny_models["math"], data_dir, coordinator, network="resume", watch_period=0.5))
        try:
            first.start()
            partial = first.store.partial_path(h) / "model.safetensors"
            assert wait_for(lambda: partial.is_file() and partial.stat().st_size > 0)
            first_peer_id = first.info.peer_id
        finally:
            first.stop()
        store = ModelStore(data_dir)
        assert not store.has(h) and store.list() == []  # nothing half-written entered the store
        kept = partial.stat().st_size
        assert 0 < kept < (merged / "model.safetensors").stat().st_size

        servicer.delay = 0.0
        second = Node(node_config(tiny_models["math"], data_dir, coordinator, network="resume", watch_period=0.5))
        try:
            second.start()
            assert wait_for(lambda: second.watcher.current is not None), second.watcher.last_error
            assert second.store.has(h) and build_manifest(second.store.path(h)).hash == h
            assert not second.store.partial_path(h).exists()
            assert second.info.peer_id == first_peer_id  # the identity key in the data dir persists
        finally:
            second.stop()
    finally:
        server.stop()
        dht.shutdown()
