"""Model store, gRPC checkpoint service and the resumable, verifying transfer client."""

from __future__ import annotations

import filecmp
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest

from umm.checkpoints.manifest import build_manifest, verify_folder
from umm.net.errors import (
    AllProvidersDropped,
    HashMismatch,
    ManifestHashError,
    ManifestUnavailable,
    NoProvider,
    ProvidersExhausted,
    SizeLimitError,
    StoreError,
    TransferCancelled,
)
from umm.net.proto import umm_checkpoint_pb2 as pb
from umm.net.proto import umm_checkpoint_pb2_grpc as pb_grpc
from umm.net.server import CheckpointServer, CheckpointServicer
from umm.net.store import MANIFEST_NAME, ModelStore
from umm.net.transfer import download

CHUNK = 16 << 10  # small chunks: the tiny model's weights span ~35 of them
BIG = "model.safetensors"


@pytest.fixture()
def model(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "served" / "math"
    shutil.copytree(tiny_models["math"], folder)
    return folder


@pytest.fixture()
def manifest(model):
    return build_manifest(model)


def serve(servicer: CheckpointServicer, request) -> str:
    server = CheckpointServer(servicer)
    request.addfinalizer(lambda: server.stop(grace=None))
    return server.address


def same_files(a: Path, b: Path, manifest) -> bool:
    return all(filecmp.cmp(a / e.path, b / e.path, shallow=False) for e in manifest.files)


# --- store -------------------------------------------------------------------------------------


def test_store_add_list_remove(model, manifest, tmp_path):
    store = ModelStore(tmp_path / "data")
    assert store.list() == [] and not store.has(manifest.hash)
    h = store.add_folder(model)
    assert h == manifest.hash and store.list() == [h] and store.has(h)
    path = store.path(h)
    assert path == tmp_path / "data" / "models" / h
    verify_folder(path, manifest)  # the stored manifest is a dot-file, outside the manifest
    assert store.manifest(h) == manifest and (path / MANIFEST_NAME).read_bytes() == manifest.canonical_json()
    assert not store.partial_path(h).exists()
    assert store.remove(h) and not store.has(h) and not path.exists() and not store.remove(h)
    with pytest.raises(StoreError):
        store.path("../" + h[3:])


def test_store_commits_only_complete_verified_models(model, manifest, tmp_path):
    store = ModelStore(tmp_path / "data")
    partial = store.begin(manifest)
    for e in manifest.files:
        if e.path != BIG:
            shutil.copyfile(model / e.path, partial / e.path)
    data = (model / BIG).read_bytes()
    (partial / BIG).write_bytes(data[: len(data) // 2])  # a download cut in the middle
    with pytest.raises(StoreError, match="missing|wrong size"):
        store.commit(manifest, verify=False)
    (partial / BIG).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # right size, wrong bytes
    with pytest.raises(StoreError, match="sha256"):
        store.commit(manifest, verify=True)
    assert store.list() == [] and not (store.models_dir / manifest.hash).exists()
    assert (partial / BIG).exists()  # kept for the next attempt
    (partial / BIG).write_bytes(data)
    assert store.commit(manifest) == store.path(manifest.hash) and not partial.exists()


# --- server ------------------------------------------------------------------------------------


def test_server_serves_only_manifest_files(model, manifest, request):
    servicer = CheckpointServicer(chunk_size=CHUNK)
    h = servicer.register_folder(model)
    (model / "secret.txt").write_text("not in the manifest")
    (model.parent / "outside.txt").write_text("outside the folder")
    address = serve(servicer, request)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.CheckpointServiceStub(channel)
        raw = stub.GetManifest(pb.GetManifestRequest(manifest_hash=h)).manifest_json
        assert raw == manifest.canonical_json()
        chunks = list(stub.ReadFile(pb.ReadFileRequest(manifest_hash=h, path=BIG, offset=100)))
        assert b"".join(c.data for c in chunks) == (model / BIG).read_bytes()[100:]
        assert chunks[1].offset == 100 + CHUNK
        for bad in ["../outside.txt", "secret.txt", "/etc/passwd", "config.json/../../outside.txt", ""]:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.ReadFile(pb.ReadFileRequest(manifest_hash=h, path=bad)))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, bad
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ReadFile(pb.ReadFileRequest(manifest_hash=h, path=BIG, offset=10**9)))
        assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(grpc.RpcError) as err:
            stub.GetManifest(pb.GetManifestRequest(manifest_hash="0" * 64))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


# --- transfer ----------------------------------------------------------------------------------


def test_round_trip_from_a_store(model, tmp_path, request):
    (model / "extra" / "deeper").mkdir(parents=True)
    (model / "extra" / "deeper" / "notes.txt").write_text("a file in a subfolder")
    (model / "extra" / "empty.bin").write_bytes(b"")
    manifest = build_manifest(model)
    source = ModelStore(tmp_path / "source")
    h = source.add_folder(model)
    address = serve(CheckpointServicer(source, chunk_size=CHUNK), request)
    dest = ModelStore(tmp_path / "dest")
    path = download(h, [address], dest, max_bytes=10**9, progress=False)
    assert path == dest.path(h) and dest.list() == [h]
    verify_folder(path, manifest)
    assert same_files(model, path, manifest)
    assert download(h, ["127.0.0.1:1"], dest, max_bytes=10**9) == path  # already there: no network


def test_download_reports_its_bytes(model, tmp_path, request, recorder):
    source = ModelStore(tmp_path / "source")
    h = source.add_folder(model)
    address = serve(CheckpointServicer(source, chunk_size=CHUNK), request)
    download(h, [address], ModelStore(tmp_path / "dest"), max_bytes=10**9, on_progress=recorder)
    (bar,) = recorder.bars
    assert bar.desc == f"fetching {h[:12]}" and bar.unit == "B"
    assert bar.total == bar.done == build_manifest(model).total_bytes and bar.closed


class FlakyServicer(CheckpointServicer):
    """Breaks the first ``breaks`` streams of the big file after ``after`` bytes; records offsets."""

    def __init__(self, *args, breaks: int = 1, after: int = 5 * CHUNK, **kwargs):
        super().__init__(*args, **kwargs)
        self.breaks, self.after, self.offsets = breaks, after, []

    def ReadFile(self, request, context):
        if request.path != BIG:
            yield from super().ReadFile(request, context)
            return
        self.offsets.append(request.offset)
        sent = 0
        for chunk in super().ReadFile(request, context):
            if self.breaks > 0 and sent >= self.after:
                self.breaks -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")
            yield chunk
            sent += len(chunk.data)


def test_resume_after_a_broken_stream(model, manifest, tmp_path, request):
    servicer = FlakyServicer(chunk_size=CHUNK, breaks=1)
    h = servicer.register_folder(model)
    address = serve(servicer, request)
    dest = ModelStore(tmp_path / "dest")
    path = download(h, [address], dest, max_bytes=10**9, retries=2, progress=False)
    assert servicer.offsets[0] == 0 and servicer.offsets[1] >= 5 * CHUNK  # resumed, not restarted
    assert same_files(model, path, manifest)


def test_killed_provider_leaves_no_partial_model_then_resumes(model, manifest, tmp_path, request):
    dying = FlakyServicer(chunk_size=CHUNK, breaks=10**6)  # every stream of the big file breaks
    h = dying.register_folder(model)
    dest = ModelStore(tmp_path / "dest")
    with pytest.raises(ProvidersExhausted, match=r"model\.safetensors") as err:
        download(h, [serve(dying, request)], dest, max_bytes=10**9, retries=2, progress=False)
    assert not err.value.permanent  # the provider broke, not the model: a later try may work
    assert "UNAVAILABLE" in str(err.value) and "partial data kept" in str(err.value)
    assert dest.list() == [] and not (dest.models_dir / h).exists()
    partial_size = (dest.partial_path(h) / BIG).stat().st_size
    assert 0 < partial_size < manifest.entry(BIG).size

    healthy = FlakyServicer(chunk_size=CHUNK, breaks=0)
    healthy.register_folder(model)
    path = download(h, [serve(healthy, request)], dest, max_bytes=10**9, progress=False)
    assert healthy.offsets == [partial_size]  # continued where the dead provider stopped
    assert same_files(model, path, manifest) and not dest.partial_path(h).exists()


def test_failover_from_a_provider_serving_wrong_bytes(model, manifest, tmp_path, request):
    tampered = tmp_path / "tampered"
    shutil.copytree(model, tampered)
    data = bytearray((tampered / BIG).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / BIG).write_bytes(bytes(data))
    liar = CheckpointServicer(chunk_size=CHUNK)
    liar.register_folder(tampered, manifest=manifest)  # claims the original manifest
    honest = CheckpointServicer(chunk_size=CHUNK)
    h = honest.register_folder(model)
    liar_address, honest_address = serve(liar, request), serve(honest, request)

    only_liar = ModelStore(tmp_path / "only-liar")
    with pytest.raises(HashMismatch, match="do not match the manifest sha256") as err:
        download(h, [liar_address], only_liar, max_bytes=10**9, progress=False)
    assert err.value.permanent
    assert only_liar.list() == [] and not (only_liar.partial_path(h) / BIG).exists()

    dest = ModelStore(tmp_path / "dest")
    path = download(h, [liar_address, honest_address], dest, max_bytes=10**9, parallel_files=1, progress=False)
    assert same_files(model, path, manifest)


class OversendingServicer(CheckpointServicer):
    def ReadFile(self, request, context):
        yield from super().ReadFile(request, context)
        yield pb.FileChunk(offset=self.lookup(request.manifest_hash).entries[request.path].size, data=b"x" * 10)


def test_provider_sending_more_than_the_manifest_is_dropped(model, manifest, tmp_path, request):
    servicer = OversendingServicer(chunk_size=CHUNK)
    h = servicer.register_folder(model)
    dest = ModelStore(tmp_path / "dest")
    with pytest.raises(AllProvidersDropped, match="more than the") as err:
        download(h, [serve(servicer, request)], dest, max_bytes=10**9, progress=False)
    assert not isinstance(err.value, HashMismatch) and not err.value.permanent
    assert dest.list() == []


class WrongManifestServicer(CheckpointServicer):
    def GetManifest(self, request, context):
        return pb.GetManifestResponse(manifest_json=self.lookup(request.manifest_hash).manifest_json + b" ")


def test_manifest_that_does_not_hash_to_the_request_is_rejected(model, tmp_path, request):
    servicer = WrongManifestServicer()
    h = servicer.register_folder(model)
    dest = ModelStore(tmp_path / "dest")
    with pytest.raises(ManifestHashError, match="manifest hashing to") as err:
        download(h, [serve(servicer, request)], dest, max_bytes=10**9, progress=False)
    assert dest.list() == [] and not dest.partial_path(h).exists() and err.value.permanent


def test_size_limit(model, manifest, tmp_path, request):
    servicer = CheckpointServicer()
    h = servicer.register_folder(model)
    dest = ModelStore(tmp_path / "dest")
    with pytest.raises(SizeLimitError, match="over the limit") as err:
        download(h, [serve(servicer, request)], dest, max_bytes=manifest.total_bytes - 1, progress=False)
    assert dest.list() == [] and not dest.partial_path(h).exists() and err.value.permanent


class StallingServicer(CheckpointServicer):
    """After two chunks: silence, or a flood of empty chunks (no progress either way)."""

    def __init__(self, *args, empty_chunks: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.empty_chunks = empty_chunks

    def ReadFile(self, request, context):
        for i, chunk in enumerate(super().ReadFile(request, context)):
            if i == 2:
                end = time.monotonic() + 10
                while context.is_active() and time.monotonic() < end:
                    if self.empty_chunks:
                        yield pb.FileChunk(offset=chunk.offset, data=b"")
                    time.sleep(0.01)
                return
            yield chunk


@pytest.mark.parametrize("empty_chunks", [False, True], ids=["silent", "empty-chunks"])
def test_stalled_provider_is_abandoned_for_another(model, manifest, tmp_path, request, empty_chunks):
    staller = StallingServicer(chunk_size=CHUNK, empty_chunks=empty_chunks)
    h = staller.register_folder(model)
    good = CheckpointServicer(chunk_size=CHUNK)
    good.register_folder(model)
    dest = ModelStore(tmp_path / "dest")
    t0 = time.monotonic()
    path = download(h, [serve(staller, request), serve(good, request)], dest, max_bytes=10**9, retries=1,
                    timeout=1.0, progress=False)
    assert time.monotonic() - t0 < 8
    assert same_files(model, path, manifest)


def test_no_providers_and_unreachable_provider(model, tmp_path):
    h = build_manifest(model).hash
    dest = ModelStore(tmp_path / "dest")
    with pytest.raises(NoProvider, match="no provider"):
        download(h, [], dest, max_bytes=10**9)
    with pytest.raises(ManifestUnavailable, match="127.0.0.1:1"):
        download(h, ["127.0.0.1:1"], dest, max_bytes=10**9, retries=1, timeout=2.0, progress=False)
    with pytest.raises(StoreError):
        download("not-a-hash", ["127.0.0.1:1"], dest, max_bytes=10**9)


def test_cancel_stops_a_download_and_keeps_its_partial_files(model, manifest, tmp_path, request):
    staller = StallingServicer(chunk_size=CHUNK, empty_chunks=False)
    h = staller.register_folder(model)
    dest = ModelStore(tmp_path / "dest")
    cancel = threading.Event()
    outcome: list[BaseException | Path] = []

    def run() -> None:
        try:
            outcome.append(download(h, [serve(staller, request)], dest, max_bytes=10**9, timeout=60.0,
                                    cancel=cancel, progress=False))
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 10
    while not (dest.partial_path(h) / BIG).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # the big file's stream is now stalled (60 s stall timeout)
    t0 = time.monotonic()
    cancel.set()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - t0 < 5
    assert isinstance(outcome[0], TransferCancelled) and "cancelled" in str(outcome[0])
    assert dest.list() == [] and (dest.partial_path(h) / BIG).stat().st_size == 2 * CHUNK


def test_download_syncs_files_in_the_background_while_streaming(model, manifest, tmp_path, request, monkeypatch):
    """Once ``DEFAULT_SYNC_EVERY`` bytes of a file arrived, an ``fdatasync`` of that file starts in a
    background thread (the stream goes on); the downloaded files are complete and correct.

    How many syncs run depends on the disk (a sync still running absorbs the next threshold), so
    only the first one is certain: it is queued at the threshold and ``stop`` lets it finish."""
    import os

    import umm.checkpoints.writer as writer
    import umm.net.transfer as transfer

    synced: list[tuple[str, int, int, int]] = []  # (thread, device, inode, file size) per sync
    real = writer._datasync

    def recording_sync(fd: int) -> None:
        st = os.fstat(fd)
        synced.append((threading.current_thread().name, st.st_dev, st.st_ino, st.st_size))
        real(fd)

    monkeypatch.setattr(writer, "_datasync", recording_sync)
    monkeypatch.setattr(transfer, "DEFAULT_SYNC_EVERY", 4 * CHUNK)
    servicer = CheckpointServicer(chunk_size=CHUNK)
    h = servicer.register_folder(model)
    dest = ModelStore(tmp_path / "dest")
    path = download(h, [serve(servicer, request)], dest, max_bytes=10**9, progress=False)
    assert same_files(model, path, manifest)
    big = os.stat(path / BIG)  # the partial file, renamed into the store: same inode
    assert big.st_size > 8 * CHUNK  # the big file spans several sync thresholds
    on_big = [s for s in synced if (s[1], s[2]) == (big.st_dev, big.st_ino)]
    assert on_big, synced
    for thread, _, _, size in on_big:
        assert thread == "umm-fdatasync"  # not the downloading thread
        assert size >= 4 * CHUNK  # not before the threshold
