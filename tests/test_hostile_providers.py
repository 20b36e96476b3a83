"""Hostile peers against the checkpoint service and its client (issue 13, findings 4, 8, 9, 10).

Each test reproduces an attack and asserts what must hold: which provider a download came from,
which one was dropped and why, what the server refused. Budgets are small so the tests are quick;
nothing here asserts a duration.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

import umm.net.transfer as transfer
from coordinator.config import CoordinatorConfigError, parse_config
from umm.checkpoints.manifest import FileEntry, Manifest, build_manifest, sha256_file
from umm.net.addresses import AddressPolicy, check_address, dial_target
from umm.net.errors import (
    AddressError,
    AllProvidersDropped,
    ManifestUnavailable,
    ModelNotFoundError,
    RecordError,
)
from umm.net.proto import umm_checkpoint_pb2 as pb
from umm.net.proto import umm_checkpoint_pb2_grpc as pb_grpc
from umm.net.ratewatch import RateWatchdog
from umm.net.records import ExpertRecord, MergedRecord, ProviderRecord, parse_record
from umm.net.server import CheckpointServer, CheckpointServicer
from umm.net.store import ModelStore
from umm.net.transfer import download

CHUNK = 16 << 10
BIG = "model.safetensors"
H = "ab" * 32


@pytest.fixture()
def model(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "served" / "math"
    shutil.copytree(tiny_models["math"], folder)
    return folder


def serve(servicer: CheckpointServicer, request, **kwargs) -> str:
    server = CheckpointServer(servicer, **kwargs)
    request.addfinalizer(lambda: server.stop(grace=None))
    return server.address


def same_files(a: Path, b: Path, manifest: Manifest) -> bool:
    return all((a / e.path).read_bytes() == (b / e.path).read_bytes() for e in manifest.files)


# --- finding 4: a slow provider ----------------------------------------------------------------


class TricklingServicer(CheckpointServicer):
    """Sends one byte every ``every`` seconds: never silent long enough for a plain idle timeout."""

    def __init__(self, *args, every: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        self.every = every
        self.streams = 0
        self.completed = 0  # streams that sent their whole file
        self._count = threading.Lock()

    def ReadFile(self, request, context):
        model = self.lookup(request.manifest_hash)
        entry = model.entries[request.path]
        with self._count:
            self.streams += 1
        data = (model.root / entry.path).read_bytes()
        for offset in range(request.offset, entry.size):
            if not context.is_active():
                break
            yield pb.FileChunk(offset=offset, data=data[offset : offset + 1])
            time.sleep(self.every)
        else:
            with self._count:
                self.completed += 1


class CountingServicer(CheckpointServicer):
    """An honest provider that counts the bytes it sends per file."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: dict[str, int] = {}
        self._count = threading.Lock()

    def ReadFile(self, request, context):
        for chunk in super().ReadFile(request, context):
            with self._count:
                self.sent[request.path] = self.sent.get(request.path, 0) + len(chunk.data)
            yield chunk


def test_a_trickling_provider_is_dropped_and_the_honest_one_serves_the_model(model, tmp_path, request, caplog):
    manifest = build_manifest(model)
    slow = TricklingServicer(chunk_size=CHUNK)
    honest = CountingServicer(chunk_size=CHUNK)
    h = slow.register_folder(model)
    honest.register_folder(model)
    slow_address = serve(slow, request)
    dest = ModelStore(tmp_path / "dest")
    caplog.set_level("WARNING", logger="umm.net.transfer")
    # 20 bytes/s against a minimum of 4 KiB/s, judged over windows of 0.5 s
    path = download(h, [slow_address, serve(honest, request)], dest, max_bytes=10**9, timeout=0.5,
                    min_rate=4096, retries=3, progress=False)
    assert same_files(model, path, manifest)
    assert slow.streams >= 1 and slow.completed == 0  # it was asked, and cut before it finished a file
    # the honest one sent every file, all but the few bytes the slow one trickled before its cut
    assert set(honest.sent) == {e.path for e in manifest.files if e.size}
    assert all(honest.sent[e.path] >= e.size - 100 for e in manifest.files if e.size)
    assert any(slow_address in r.message and "too slow" in r.message for r in caplog.records)


def test_a_download_whose_only_provider_trickles_fails_naming_it(model, tmp_path, request):
    slow = TricklingServicer(chunk_size=CHUNK)
    h = slow.register_folder(model)
    address = serve(slow, request)
    dest = ModelStore(tmp_path / "dest")
    with pytest.raises(AllProvidersDropped, match="too slow") as err:
        download(h, [address], dest, max_bytes=10**9, timeout=0.5, min_rate=4096, progress=False)
    assert address in str(err.value) and dest.list() == []


def test_each_file_has_a_deadline_from_its_size_and_the_minimum_rate(tmp_path, request, monkeypatch):
    """Even a provider that passed every rate window may not take longer than timeout + size / min_rate."""
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(os.urandom(2048))
    slow = TricklingServicer(every=0.01)  # ~100 bytes/s: 20 s for the file
    h = slow.register_folder(folder)
    address = serve(slow, request)
    monkeypatch.setattr(RateWatchdog, "_judge", lambda self, w, now: None)  # windows never cut: only the deadline
    with pytest.raises(AllProvidersDropped, match=r"missed the file's deadline of 1 s") as err:
        download(h, [address], ModelStore(tmp_path / "dest"), max_bytes=10**9, timeout=0.5, min_rate=4096,
                 retries=1, progress=False)  # deadline 0.5 + 2048 / 4096 = 1 s
    assert address in str(err.value) and slow.streams == 1 and slow.completed == 0


class _Providers:
    """The DHT part a round's fetch step reads: who else serves a model."""

    def __init__(self, extra: dict[str, list[str]]):
        self.extra = extra

    def providers(self, manifest_hash):
        return {i: type("E", (), {"record": ProviderRecord(manifest_hash=manifest_hash, address=a)})()
                for i, a in enumerate(self.extra.get(manifest_hash, []))}


def test_a_round_fetches_past_slow_providers_into_quarantine_and_admission_promotes(tiny_models, tmp_path, request):
    from coordinator.db import StateDB
    from coordinator.round import RoundContext, RoundRunner
    from coordinator.steps import DiscoverStep, RoundResults

    folders = {}
    for name in ("math", "code"):
        folders[name] = tmp_path / "served" / name
        shutil.copytree(tiny_models[name], folders[name])
    slow, honest = TricklingServicer(), CheckpointServicer()
    hashes = {name: slow.register_folder(f) for name, f in folders.items()}
    honest.register_folder(folders["math"])
    slow_address, honest_address = serve(slow, request), serve(honest, request)
    # Both experts announce one address: lift the per-address Sybil cap so the round fetches both.
    config = parse_config({"data_dir": str(tmp_path / "coord"), "fetch_timeout": 0.5, "fetch_min_rate": 4096,
                           "fetch_concurrency": 2, "fetch_retries": 1, "max_new_experts_per_address": 2})
    db = StateDB(tmp_path / "coord" / "state.db")
    request.addfinalizer(db.close)
    for name, h in hashes.items():  # both announce the slow address; math is also served honestly
        db.upsert_expert(h, "owner-" + name, name, [name], slow_address, {})
    store = ModelStore(config.data_dir)
    runner = RoundRunner(RoundContext(config=config, db=db, store=store,
                                      records=_Providers({hashes["math"]: [honest_address]}), address=""))
    results = RoundResults(discover=DiscoverStep(experts=sorted(hashes.values())))
    results.fetch = runner.step_fetch(1, results)
    assert results.fetch.fetched == [hashes["math"]] and results.fetch.failed == [hashes["code"]]
    assert "too slow" in db.fetch(hashes["code"]).error  # recorded; retried next round
    assert store.quarantined(hashes["math"]) and store.list() == []  # not served before admission
    admitted = runner.step_admit(1, results)
    assert admitted.admitted == [hashes["math"]] and store.list() == [hashes["math"]]
    assert not store.quarantined(hashes["math"])


# --- finding 4: clients that hoard streams -----------------------------------------------------


@pytest.fixture()
def big_model(tmp_path) -> Path:
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(8 << 20))  # far above HTTP/2 flow-control windows
    (folder / "config.json").write_text('{"model_type": "llama"}')
    return folder


def test_clients_that_open_streams_and_never_read_do_not_block_a_download(big_model, tmp_path, request):
    servicer = CheckpointServicer(chunk_size=1 << 20, max_streams_per_peer=4, send_timeout=0.5)
    h = servicer.register_folder(big_model)
    # 8 worker threads: without per-peer slots and send timeouts, 20 idle readers would hold them all
    address = serve(servicer, request, max_workers=8)
    hoarders = []
    for _ in range(20):
        channel = grpc.insecure_channel(address)
        request.addfinalizer(channel.close)
        call = pb_grpc.CheckpointServiceStub(channel).ReadFile(
            pb.ReadFileRequest(manifest_hash=h, path="weights.bin"), timeout=60)
        hoarders.append(call)
    dest = ModelStore(tmp_path / "dest")
    path = download(h, [address], dest, max_bytes=10**9, timeout=5.0, retries=20, progress=False)
    assert same_files(big_model, path, build_manifest(big_model))
    codes = set()
    for call in hoarders:
        try:
            for _ in call:
                pass
        except grpc.RpcError as e:
            codes.add(e.code())
    # refused (over the peer's slots) or cut by the server (never read): none got its file
    assert codes <= {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED} and codes


class _Context:
    def __init__(self, peer: str):
        self._peer = peer

    def peer(self) -> str:
        return self._peer

    def abort(self, code, details):
        raise RuntimeError(code)


def test_stream_slots_are_counted_per_peer_address_not_per_connection():
    servicer = CheckpointServicer(max_streams_per_peer=2)
    a1, a2, b = _Context("ipv4:10.0.0.1:5000"), _Context("ipv4:10.0.0.1:5001"), _Context("ipv6:[::1]:5000")
    with servicer._stream_slot(a1), servicer._stream_slot(a2):
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"), servicer._stream_slot(a1):
            pass
        with servicer._stream_slot(b):  # another peer still gets in
            pass
    with servicer._stream_slot(a1):  # slots come back when streams end
        pass
    assert servicer._streams == {}


# --- finding 8: records name any address -------------------------------------------------------

FORBIDDEN = {
    "unix-abstract:umm-test": "not host:port",
    "unix-abstract:1234": "gRPC target scheme",
    "unix:/tmp/umm.sock": "not host:port",
    "unix:5000": "gRPC target scheme",
    "dns:evil.example:443": "not an IPv4 address",
    "dns:///evil.example:443": "not an IPv4 address",
    "ipv4:127.0.0.1:5000": "not an IPv4 address",
    "169.254.169.254:80": "forbidden range 169.254.0.0/16",
    "[fe80::1]:80": "forbidden range fe80::/10",
    "[::ffff:169.254.169.254]:80": "forbidden range 169.254.0.0/16",
    "[fd00:ec2::254]:80": "forbidden range fd00:ec2::254/128",
    "224.0.0.1:5000": "forbidden range 224.0.0.0/4",
    "0.0.0.0:5000": "forbidden range 0.0.0.0/8",
    "[::]:5000": "forbidden range ::/128",
    "255.255.255.255:5000": "forbidden range 240.0.0.0/4",
    "127.0.0.1:0": "TCP port 1-65535",
    "127.0.0.1:65536": "TCP port 1-65535",
    "user@host:5000": "not an IPv4 address",
    "host/path:5000": "not an IPv4 address",
    "[not-ipv6]:5000": "not an IPv6 address",
    "127.0.0.1": "not host:port",
}


def _record_value(address: str) -> dict:
    return {"schema_version": 1, "name": "m", "domains": ["math"], "architecture": "a", "tokenizer": "t",
            "num_parameters": 1, "manifest_hash": H, "total_bytes": 1, "address": address, "self_scores": {},
            "base_model": None, "software_version": "0"}


@pytest.mark.parametrize("address", sorted(FORBIDDEN))
def test_records_with_a_forbidden_address_are_refused_with_the_reason(address):
    with pytest.raises(RecordError, match="address") as err:
        parse_record(ExpertRecord, _record_value(address))
    assert FORBIDDEN[address] in str(err.value)
    with pytest.raises(RecordError):
        parse_record(ProviderRecord, {"schema_version": 1, "manifest_hash": H, "address": address})
    with pytest.raises(AddressError, match=FORBIDDEN[address].replace("[", r"\[").replace(".", r"\.")):
        check_address(address)


@pytest.mark.parametrize("address", ["127.0.0.1:5000", "[::1]:5000", "10.1.2.3:5000", "8.8.8.8:443",
                                     "localhost:5000", "node-7.example.org:31337"])
def test_ordinary_addresses_are_accepted(address):
    assert parse_record(ExpertRecord, _record_value(address)).address == address


def test_download_never_dials_a_forbidden_address(model, tmp_path, monkeypatch):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0umm-test")  # the abstract socket a hostile record names
    listener.listen(4)
    listener.settimeout(0.2)
    dialled: list[str] = []
    real = grpc.insecure_channel
    monkeypatch.setattr(transfer.grpc, "insecure_channel",
                        lambda target, *a, **k: dialled.append(target) or real(target, *a, **k))
    try:
        with pytest.raises(ManifestUnavailable) as err:
            download(H, sorted(FORBIDDEN), ModelStore(tmp_path / "dest"), max_bytes=10**9, retries=1, timeout=1.0,
                     progress=False)
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()
    assert dialled == []
    text = str(err.value)
    for address, reason in FORBIDDEN.items():
        assert f"provider {address}: not dialled" in text and reason in text


def test_the_allowed_ranges_are_a_config_checked_again_right_before_dialling(model, tmp_path, request, monkeypatch):
    servicer = CheckpointServicer()
    h = servicer.register_folder(model)
    address = serve(servicer, request)
    port = address.rsplit(":", 1)[1]
    only_private = parse_config({"allowed_networks": ["10.0.0.0/8"]}).address_policy()
    no_loopback = AddressPolicy(denied=("127.0.0.0/8",))
    dialled: list[str] = []
    real = grpc.insecure_channel
    monkeypatch.setattr(transfer.grpc, "insecure_channel",
                        lambda target, *a, **k: dialled.append(target) or real(target, *a, **k))
    for policy, addr, why in [(only_private, address, "not in an allowed range"),
                              (no_loopback, f"localhost:{port}", "forbidden range 127.0.0.0/8")]:
        with pytest.raises(ManifestUnavailable, match=why):
            download(h, [addr], ModelStore(tmp_path / "dest"), max_bytes=10**9, retries=1, policy=policy,
                     progress=False)
    assert dialled == []
    # the default policy keeps loopback (local networks and tests), and dials the checked IP itself
    assert dial_target(f"localhost:{port}") in (f"ipv4:127.0.0.1:{port}", f"ipv6:[::1]:{port}")
    path = download(h, [address], ModelStore(tmp_path / "dest"), max_bytes=10**9, progress=False)
    assert dialled == [f"ipv4:{address}"] and path.is_dir()
    with pytest.raises(CoordinatorConfigError, match="CIDR"):
        parse_config({"denied_networks": ["not-a-network"]})
    with pytest.raises(RecordError, match="forbidden range"):
        parse_record(MergedRecord, {"schema_version": 1, "round": 1, "name": "n", "manifest_hash": H,
                                    "total_bytes": 1, "address": "169.254.169.254:80", "sources": [],
                                    "method": "m", "recipe_hash": H, "scores": {}, "source_scores": {},
                                    "published_at": 0.0})


# --- finding 9: serving follows a swapped symlink ----------------------------------------------


def _read(address: str, h: str, path: str) -> bytes:
    with grpc.insecure_channel(address) as channel:
        chunks = pb_grpc.CheckpointServiceStub(channel).ReadFile(pb.ReadFileRequest(manifest_hash=h, path=path),
                                                                 timeout=30)
        return b"".join(c.data for c in chunks)


@pytest.mark.parametrize("swap", ["file-link", "folder-link", "other-file"])
def test_a_file_swapped_after_registration_is_not_served(tmp_path, request, swap):
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "vocab.txt").write_text("hello")
    secret = tmp_path / "secret"
    (secret / "sub").mkdir(parents=True)
    (secret / "config.json").write_text('{"SECRET": 1}')
    (secret / "sub" / "vocab.txt").write_text("SECRET")
    servicer = CheckpointServicer()
    h = servicer.register_folder(root)
    address = serve(servicer, request)
    assert _read(address, h, "sub/vocab.txt") == b"hello"
    if swap == "file-link":
        target = "config.json"
        (root / "config.json").unlink()
        (root / "config.json").symlink_to(secret / "config.json")
    elif swap == "folder-link":
        target = "sub/vocab.txt"
        shutil.rmtree(root / "sub")
        (root / "sub").symlink_to(secret / "sub")
    else:  # a different regular file, same size: not the one registered
        target = "config.json"
        tmp = root / ".swap"
        tmp.write_text('{"b": 2}')
        os.replace(tmp, root / "config.json")
    with pytest.raises(grpc.RpcError) as err:
        _read(address, h, target)
    assert err.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNAVAILABLE)
    assert "SECRET" not in (err.value.details() or "")


def test_a_store_model_with_a_swapped_file_is_not_served(model, tmp_path, request):
    store = ModelStore(tmp_path / "store")
    h = store.add_folder(model)
    address = serve(CheckpointServicer(store), request)
    assert _read(address, h, "config.json") == (model / "config.json").read_bytes()
    (tmp_path / "secret.json").write_text("SECRET")
    stored = store.path(h) / "config.json"
    stored.unlink()
    stored.symlink_to(tmp_path / "secret.json")
    with pytest.raises(grpc.RpcError) as err:
        _read(address, h, "config.json")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# --- finding 10: partial downloads, quarantine -------------------------------------------------


def _abandoned(store: ModelStore, name: str, size: int, age: float) -> Path:
    folder = store.partial_path(name * 64)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"\0" * size)
    then = time.time() - age
    for p in (folder / "model.safetensors", folder):
        os.utime(p, (then, then))
    return folder


def test_abandoned_partials_count_toward_the_budget_and_the_oldest_are_reclaimed(model, tmp_path, request):
    servicer = CheckpointServicer()
    h = servicer.register_folder(model)
    address = serve(servicer, request)
    total = build_manifest(model).total_bytes
    store = ModelStore(tmp_path / "dest")
    mib = 1 << 20
    oldest, middle, newest = (_abandoned(store, c, 4 * mib, age) for c, age in (("a", 300), ("b", 200), ("c", 100)))
    busy = _abandoned(store, "d", 4 * mib, 400)  # another download is filling this one: never reclaimed
    with store.lock("d" * 64):
        download(h, [address], store, max_bytes=10 * mib, progress=False)
    assert busy.exists()
    # abandoned bytes must fit the budget this model leaves (10 MiB - its size): the oldest went
    assert not oldest.exists() and middle.exists() and newest.exists()
    assert 8 * mib <= 10 * mib - total < 12 * mib
    removed = store.reclaim(budget=10**12, max_age=50)  # and old ones go whatever the budget
    assert removed == ["d" * 64, "b" * 64, "c" * 64] and not any(store.partial_dir.glob("*/*"))


def test_a_quarantined_model_is_not_served_until_promoted(model, tmp_path, request):
    manifest = build_manifest(model)
    source = CheckpointServicer()
    h = source.register_folder(model)
    store = ModelStore(tmp_path / "coord")
    path = download(h, [serve(source, request)], store, max_bytes=10**9, quarantine=True, progress=False)
    assert store.quarantined(h) and not store.has(h) and store.list() == []
    assert path == store.candidate_path(h) and same_files(model, path, manifest)
    served = serve(CheckpointServicer(store), request)
    with grpc.insecure_channel(served) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.CheckpointServiceStub(channel).GetManifest(pb.GetManifestRequest(manifest_hash=h), timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert download(h, ["127.0.0.1:1"], store, max_bytes=10**9, quarantine=True) == path  # no refetch
    assert store.promote(h) == store.path(h) and not store.quarantined(h) and store.list() == [h]
    assert _read(served, h, "config.json") == (model / "config.json").read_bytes()
    assert store.promote(h) == store.path(h)  # idempotent (a resumed round may promote twice)
    assert store.remove(h) and not store.has(h)
    with pytest.raises(ModelNotFoundError):
        store.promote(h)


def test_discard_drops_a_quarantined_model(model, tmp_path, request):
    source = CheckpointServicer()
    h = source.register_folder(model)
    store = ModelStore(tmp_path / "coord")
    download(h, [serve(source, request)], store, max_bytes=10**9, quarantine=True, progress=False)
    assert store.discard(h) and not store.quarantined(h) and not store.discard(h)
    assert not any(store.quarantine_dir.iterdir())


def test_a_registered_manifest_naming_a_link_is_never_served(tmp_path, request):
    root = tmp_path / "model"
    root.mkdir()
    (tmp_path / "secret.txt").write_text("SECRET")
    (root / "link.txt").symlink_to(tmp_path / "secret.txt")
    entry = FileEntry("link.txt", 6, sha256_file(tmp_path / "secret.txt"))
    servicer = CheckpointServicer()
    h = servicer.register_folder(root, Manifest((entry,)))
    with pytest.raises(grpc.RpcError) as err:
        _read(serve(servicer, request), h, "link.txt")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
