"""Download a whole model by manifest hash from peers serving ``CheckpointService``.

:func:`download` trusts nothing a provider says until it is checked:

- the manifest bytes must hash to the requested manifest hash (else the provider is dropped);
- the model must fit ``max_bytes`` (checked on the manifest, then per chunk: a provider that
  sends more bytes than a file's manifest size is dropped);
- every file's sha256 is computed while it streams and must match the manifest (else the file is
  deleted and the provider dropped for the rest of this download);
- a provider must keep a minimum rate and deliver each file within a deadline (else it is
  dropped), so a peer that trickles bytes cannot hold a download;
- an address is dialled only if it is ``host:port`` over TCP in an allowed range
  (:mod:`umm.net.addresses`), checked right before dialling.

Files download in parallel; a broken connection or a stalled stream (no data for ``timeout``
seconds) leaves the partial file in ``<data_dir>/partial/<hash>/`` and the next attempt resumes it
from its size, with the same or another provider. Only a complete, verified model enters the
store, by one rename; a failed download raises a typed :class:`TransferError` and keeps its
partial files for a later retry.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from umm.checkpoints.errors import CheckpointError
from umm.checkpoints.manifest import FileEntry, Manifest, list_files
from umm.checkpoints.writer import DEFAULT_SYNC_EVERY, BackgroundSync
from umm.net.addresses import DEFAULT_POLICY, AddressPolicy, dial_target
from umm.net.errors import (
    AddressError,
    AllProvidersDropped,
    HashMismatch,
    InvalidManifest,
    ManifestHashError,
    ManifestUnavailable,
    NoProvider,
    ProvidersExhausted,
    SizeLimitError,
    TransferCancelled,
    TransferError,
)
from umm.net.proto import umm_checkpoint_pb2 as pb
from umm.net.proto import umm_checkpoint_pb2_grpc as pb_grpc
from umm.net.ratewatch import RateWatchdog
from umm.net.server import MAX_MESSAGE_BYTES
from umm.net.store import ModelStore, check_hash
from umm.net.wire import parse_chunk
from umm.progress import ProgressSink, open_bar
from umm.ui import human_bytes, progress_sink

logger = logging.getLogger(__name__)

_READ_BLOCK = 4 << 20
DEFAULT_MIN_RATE = 64 << 10  # bytes/s: a provider slower than this over a ``timeout`` window is dropped
DEFAULT_PARTIAL_MAX_AGE = 24 * 3600.0  # abandoned partial downloads older than this are reclaimed
# Chunks are up to MAX_MESSAGE_BYTES; HTTP/2 frames as large as allowed cut per-frame overhead.
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.enable_retries", 0),
]


class _Retryable(Exception):
    """The provider may still be fine (connection broke, stream stalled or ended early)."""


class _Stalled(_Retryable):
    """The stream sent nothing for ``timeout`` seconds."""


class _BadData(Exception):
    """The provider sent bytes that contradict the manifest: do not use it again."""


class _TooSlow(_BadData):
    """The provider fell under the minimum rate or missed a file's deadline: drop it too."""


class _WrongBytes(_BadData):
    """A file's bytes do not hash to its manifest sha256: the model may be what is wrong."""


class _Cancelled(Exception):
    """The caller cancelled the download."""


@dataclass
class _Provider:
    address: str
    channel: grpc.Channel | None  # None when the address may not be dialled (then ``bad`` says why)
    stub: pb_grpc.CheckpointServiceStub | None
    read_file: grpc.UnaryStreamMultiCallable | None  # ReadFile answering serialized FileChunks (see _parse_chunk)
    bad: str | None = None  # why it was dropped
    wrong: type[TransferError] | None = None  # set when dropped for contradicting the model's hashes
    errors: list[str] = field(default_factory=list)
    stalls: int = 0  # streams of this download it left without data for ``timeout``


def _connect(address: str, policy: AddressPolicy) -> _Provider:
    """A provider for ``address``, dialled only when ``policy`` allows it (checked right now)."""
    try:
        target = dial_target(address, policy)
    except AddressError as e:
        logger.warning("not dialling provider %s: %s", address, e)
        return _Provider(address, None, None, None, bad=f"not dialled: {e}")
    channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    read_file = channel.unary_stream(_READ_FILE_METHOD, request_serializer=pb.ReadFileRequest.SerializeToString,
                                     response_deserializer=None)
    return _Provider(address, channel, pb_grpc.CheckpointServiceStub(channel), read_file)


def _write_all(out, data: bytes | memoryview) -> None:
    """Write every byte (an unbuffered write may write fewer than asked)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view) :]


_READ_FILE_METHOD = f"/{pb.DESCRIPTOR.services_by_name['CheckpointService'].full_name}/ReadFile"


def _parse_chunk(raw: bytes) -> tuple[int, memoryview]:
    """``(offset, data)`` of a serialized ``FileChunk`` (:func:`umm.net.wire.parse_chunk`, no copy);
    malformed bytes raise :class:`_BadData`."""
    try:
        return parse_chunk(raw)
    except ValueError as e:
        raise _BadData(f"sent a malformed FileChunk ({e})") from None


def _rpc_error(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    return f"{code.name if code else 'error'}: {details}"


def _fetch_manifest(manifest_hash: str, providers: list[_Provider], retries: int, timeout: float) -> Manifest:
    for attempt in range(retries):
        for p in providers:
            if p.bad:
                continue
            try:
                reply = p.stub.GetManifest(pb.GetManifestRequest(manifest_hash=manifest_hash), timeout=timeout)
            except grpc.RpcError as e:
                p.errors.append(f"manifest: {_rpc_error(e)}")
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    p.bad = "does not serve this model"
                continue
            raw = reply.manifest_json
            got = hashlib.sha256(raw).hexdigest()
            if got != manifest_hash:
                p.bad = f"sent a manifest hashing to {got[:12]}, not {manifest_hash[:12]}"
                p.wrong = ManifestHashError
                p.errors.append(p.bad)
                logger.warning("provider %s %s", p.address, p.bad)
                continue
            try:
                manifest = Manifest.from_json(raw)
            except CheckpointError as e:  # the hash matches, so the requested name itself is bad
                raise InvalidManifest(f"model {manifest_hash[:12]} has an invalid manifest: {e}") from e
            if manifest.canonical_json() != raw:
                raise InvalidManifest(f"model {manifest_hash[:12]}: its manifest is not in canonical form")
            return manifest
        if all(p.bad for p in providers):
            break
        time.sleep(min(0.5 * 2**attempt, 5.0))
    if any(p.wrong is ManifestHashError for p in providers) and all(p.bad for p in providers):
        raise ManifestHashError(_failure_message(manifest_hash, providers, "no provider sent the right manifest"))
    raise ManifestUnavailable(_failure_message(manifest_hash, providers, "could not get the manifest"))


def _failure_message(manifest_hash: str, providers: list[_Provider], what: str) -> str:
    lines = [f"download of model {manifest_hash[:12]} failed: {what}"]
    for p in providers:
        why = p.bad or ("; ".join(p.errors[-3:]) if p.errors else "not tried")
        lines.append(f"  provider {p.address}: {why}")
    return "\n".join(lines)


class _Download:
    def __init__(self, manifest: Manifest, folder: Path, providers: list[_Provider], *, retries: int,
                 timeout: float, min_rate: float, on_bytes: Callable[[int], None], cancel: threading.Event):
        self.manifest = manifest
        self.folder = folder
        self.providers = providers
        self.retries = retries
        self.on_bytes = on_bytes
        self.watchdog = RateWatchdog(timeout, min_rate, name="umm-transfer-watchdog")
        self.timeout = timeout
        self.min_rate = min_rate
        self.cancelled = cancel
        self._lock = threading.Lock()
        self._stop_watch = threading.Thread(target=self._watch_cancel, name="umm-transfer-cancel", daemon=True)
        self._closed = threading.Event()
        self._stop_watch.start()

    def _watch_cancel(self) -> None:
        while not self._closed.is_set():
            # a short poll: close() waits for this thread, and every download ends with a close()
            if self.cancelled.wait(0.02):
                self.watchdog.cancel_all()  # again each round: calls may start after a cancel
                self._closed.wait(0.2)

    def close(self) -> None:
        self._closed.set()
        self._stop_watch.join()
        self.watchdog.close()

    def fetch(self, index: int, entry: FileEntry) -> None:
        """Bring one file to its manifest sha256, trying providers in turn; TransferError if impossible."""
        failures: dict[str, int] = {}
        while True:
            if self.cancelled.is_set():
                raise _Cancelled()
            with self._lock:
                healthy = [p for p in self.providers if not p.bad]
            usable = [p for p in healthy if failures.get(p.address, 0) < self.retries]
            if not usable:
                raise self._exhausted(entry, dropped_all=not healthy)
            # spread files over providers, prefer the ones that failed this file least
            usable.sort(key=lambda p: (failures.get(p.address, 0), (self.providers.index(p) - index) % len(self.providers)))
            p = usable[0]
            try:
                self._stream(p, entry)
                return
            except _Retryable as e:
                if self.cancelled.is_set():
                    raise _Cancelled() from None
                failures[p.address] = failures.get(p.address, 0) + 1
                with self._lock:
                    p.errors.append(f"{entry.path}: {e}")
                    if isinstance(e, _Stalled):
                        p.stalls += 1
                        if p.stalls >= self.retries:  # silent on several files: stop asking it
                            p.bad = f"stalled {p.stalls} times (no data for {self.timeout:.0f} s)"
                logger.info("provider %s, %s: %s (will resume)", p.address, entry.path, e)
                with self._lock:
                    untried = [q for q in self.providers if not q.bad and failures.get(q.address, 0) == 0]
                if not untried:  # back off before asking a provider that already failed this file
                    self.cancelled.wait(min(0.2 * 2 ** min(failures.values()), 5.0))
            except _BadData as e:
                with self._lock:
                    p.bad = f"{entry.path}: {e}"
                    p.wrong = HashMismatch if isinstance(e, _WrongBytes) else None
                    p.errors.append(p.bad)
                logger.warning("dropping provider %s: %s: %s", p.address, entry.path, e)

    def _exhausted(self, entry: FileEntry, *, dropped_all: bool) -> TransferError:
        """The error of a file no provider may be asked for again (caller holds no lock)."""
        with self._lock:
            if not dropped_all:
                kind, why = ProvidersExhausted, f"{self.retries} failed attempts per provider"
            elif any(p.wrong is HashMismatch for p in self.providers):
                kind, why = HashMismatch, "every provider was dropped"
            else:
                kind, why = AllProvidersDropped, "every provider was dropped"
            message = _failure_message(self.manifest.hash, self.providers, f"file {entry.path}: {why}")
        return kind(f"{message}\n  partial data kept in {self.folder}; retry later or with other providers")

    def deadline(self, remaining: int) -> float:
        """Seconds a stream of ``remaining`` bytes may take: ``timeout + remaining / min_rate``."""
        return self.timeout + remaining / self.min_rate

    def _stream(self, p: _Provider, entry: FileEntry) -> None:
        path = self.folder / entry.path
        path.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        pos = path.stat().st_size if path.is_file() else 0
        if pos > entry.size:
            path.unlink()
            self.on_bytes(-entry.size)
            pos = 0
        resumed = pos > 0
        if resumed:  # hash what an earlier attempt wrote, then continue after it
            with open(path, "rb", buffering=0) as fh:
                while block := fh.read(_READ_BLOCK):
                    digest.update(block)
        if pos < entry.size:
            request = pb.ReadFileRequest(manifest_hash=self.manifest.hash, path=entry.path, offset=pos)
            with open(path, "ab", buffering=0) as out:
                # fdatasync every DEFAULT_SYNC_EVERY bytes in the background: the disk writes while
                # the stream goes on, so the final fsync is short (else the kernel starts only then)
                flusher = BackgroundSync(DEFAULT_SYNC_EVERY)
                deadline = self.deadline(entry.size - pos)
                call = p.read_file(request, timeout=deadline)
                self.watchdog.watch(call, entry.size - pos)
                try:
                    for raw in call:
                        if self.cancelled.is_set():
                            raise _Cancelled()
                        offset, data = _parse_chunk(raw)
                        self.watchdog.got(call, len(data))  # only bytes count (empty chunks stall)
                        if offset != pos:
                            raise _BadData(f"sent a chunk at offset {offset}, expected {pos}")
                        if pos + len(data) > entry.size:
                            raise _BadData(f"sent more than the {entry.size} bytes of the manifest")
                        _write_all(out, data)
                        flusher.wrote(out.fileno(), len(data))
                        digest.update(data)
                        pos += len(data)
                        self.on_bytes(len(data))
                except grpc.RpcError as e:
                    why = self.watchdog.forget(call)
                    if e.code() == grpc.StatusCode.CANCELLED and why is not None and why.startswith("stalled"):
                        raise _Stalled(f"{why} at byte {pos}") from None
                    if e.code() == grpc.StatusCode.CANCELLED and why is not None:
                        raise _TooSlow(f"{why} at byte {pos}") from None
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise _TooSlow(f"missed the file's deadline of {deadline:.0f} s at byte {pos}") from None
                    if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
                        raise _BadData(f"refused a file of its own manifest ({_rpc_error(e)})") from None
                    raise _Retryable(f"{_rpc_error(e)} at byte {pos}") from None
                finally:
                    self.watchdog.forget(call)
                    call.cancel()
                    flusher.stop()  # before the file closes; raises a failed sync's OSError
                os.fsync(out.fileno())
            if pos < entry.size:
                raise _Retryable(f"stream ended at byte {pos} of {entry.size}")
        else:
            path.touch()
        if digest.hexdigest() != entry.sha256:
            path.unlink()
            self.on_bytes(-pos)
            if resumed:  # the bad bytes may come from an earlier provider: start over, blame no one
                raise _Retryable("sha256 mismatch after resuming; restarting the file")
            raise _WrongBytes(f"bytes do not match the manifest sha256 {entry.sha256[:12]}...")


def download(
    manifest_hash: str,
    providers: Sequence[str],
    store: ModelStore,
    *,
    max_bytes: int,
    parallel_files: int = 4,
    retries: int = 3,
    timeout: float = 30.0,
    min_rate: float = DEFAULT_MIN_RATE,
    progress: bool = False,
    on_progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
    policy: AddressPolicy = DEFAULT_POLICY,
    quarantine: bool = False,
    partial_max_age: float = DEFAULT_PARTIAL_MAX_AGE,
) -> Path:
    """Download model ``manifest_hash`` from ``providers`` (gRPC ``host:port``) into ``store``.

    Returns the model's folder in the store (at once if it is already there). ``max_bytes``
    bounds the model's total size, and also the abandoned partial downloads kept beside it (the
    oldest are reclaimed, as are those older than ``partial_max_age`` seconds); ``parallel_files``
    files stream at once; each provider gets ``retries`` attempts per file (and for the manifest)
    before the next is preferred. ``timeout`` is the limit in seconds for the manifest call and the
    length of the windows over which a stream must keep ``min_rate`` bytes/s: a stream silent for
    a window is retried (a provider silent ``retries`` times is dropped), a slower one drops its
    provider, and each file must arrive within ``timeout + size / min_rate`` seconds. Only
    addresses that ``policy`` allows are dialled (checked right before dialling). With
    ``quarantine`` the model goes to the store's quarantine (see :meth:`ModelStore.promote`).
    Setting ``cancel`` (or Ctrl-C) stops the download within a fraction of a second, keeping its
    partial files. Raises a :class:`TransferError` naming each provider and what went wrong with
    it; its subclass says what happened (:mod:`umm.net.errors`), and its ``permanent`` flag
    whether the model itself is at fault (too large, a wrong or invalid manifest, bytes that do
    not match the manifest) or a later try may succeed. ``on_progress`` receives a bar of the
    model's bytes; ``progress`` is shorthand for terminal bars (:func:`umm.ui.progress_sink`).
    """
    check_hash(manifest_hash)
    if store.has(manifest_hash) or (quarantine and store.quarantined(manifest_hash)):
        return store.candidate_path(manifest_hash)
    addresses = list(dict.fromkeys(a for a in providers if a))
    if not addresses:
        raise NoProvider(f"no provider for model {manifest_hash[:12]}: nobody announces it")
    if retries < 1 or parallel_files < 1 or timeout <= 0 or min_rate <= 0:
        raise ValueError("retries and parallel_files must be >= 1, timeout and min_rate > 0")
    provs = [_connect(a, policy) for a in addresses]
    try:
        manifest = _fetch_manifest(manifest_hash, provs, retries, timeout)
        total = manifest.total_bytes
        if total > max_bytes:
            raise SizeLimitError(
                f"model {manifest_hash[:12]} is {human_bytes(total)}, over the limit of {human_bytes(max_bytes)}; "
                "raise the size limit to accept it"
            )
        with store.lock(manifest_hash):
            if store.has(manifest_hash) or (quarantine and store.quarantined(manifest_hash)):
                return store.candidate_path(manifest_hash)
            store.reclaim(budget=max_bytes - total, max_age=partial_max_age, keep=manifest_hash)
            folder = store.begin(manifest)
            present = list_files(folder)
            for stray in set(present) - {e.path for e in manifest.files}:
                (folder / stray).unlink()
            sizes = {e.path: e.size for e in manifest.files}
            have = sum(min(size, sizes[rel]) for rel, size in present.items() if rel in sizes)
            bar = open_bar(progress_sink(on_progress, progress), total, f"fetching {manifest_hash[:12]}", "B")
            bar.advance(have)
            bar_lock = threading.Lock()

            def on_bytes(n: int) -> None:
                with bar_lock:
                    bar.advance(n)

            cancel = cancel if cancel is not None else threading.Event()
            job = _Download(manifest, folder, provs, retries=retries, timeout=timeout, min_rate=min_rate,
                            on_bytes=on_bytes, cancel=cancel)
            pool = ThreadPoolExecutor(max_workers=parallel_files, thread_name_prefix="umm-fetch")
            try:
                files = sorted(manifest.files, key=lambda e: -e.size)
                results = [pool.submit(job.fetch, i, e) for i, e in enumerate(files)]
                errors = [r.exception() for r in results]
            except BaseException:  # e.g. KeyboardInterrupt: stop the streams, keep the partial files
                cancel.set()
                raise
            finally:
                pool.shutdown(wait=True)
                job.close()
                bar.close()
            if cancel.is_set():
                raise TransferCancelled(
                    f"download of model {manifest_hash[:12]} cancelled; partial data kept in {folder}"
                )
            failed = [e for e in errors if e is not None]
            if failed:
                if not isinstance(failed[0], TransferError):
                    raise TransferError(f"download of model {manifest_hash[:12]} failed: {failed[0]}") from failed[0]
                raise failed[0]
            path = store.commit(manifest, verify=False, quarantine=quarantine)  # every byte was hashed as written
        logger.info("downloaded model %s (%s) from %s", manifest_hash[:12], human_bytes(total), ", ".join(addresses))
        return path
    finally:
        for p in provs:
            if p.channel is not None:
                p.channel.close()
