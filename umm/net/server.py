"""gRPC ``CheckpointService``: serves complete models from a store and/or registered folders.

Only files listed in a model's manifest are served (by exact manifest path), never anything
else under the folder:

- a file is opened component by component from the model's folder without following a single
  link (``O_NOFOLLOW`` under ``openat``), must be a regular file, and must still be the one
  registered (same device, inode, size and modification time as when the folder was registered
  or the stored model first served): a file swapped for a link is refused with ``UNAVAILABLE``,
  one replaced or edited with ``DATA_LOSS``, instead of serving other bytes;
- one peer (IP address) holds at most ``max_streams_per_peer`` ReadFile streams at once
  (``RESOURCE_EXHAUSTED`` beyond), so it cannot take every worker thread;
- a stream whose client stops reading (or reads slower than ``min_rate`` bytes/s over a window
  of ``send_timeout`` seconds) is cancelled, so idle readers do not hold threads that honest
  downloads need.

Every request is untrusted: bytes that do not parse as the request message are
``INVALID_ARGUMENT``, unknown models and paths are ``NOT_FOUND``, an offset past the end is
``OUT_OF_RANGE``; nothing else comes out of a bad request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError, Message

from umm.checkpoints.manifest import FileEntry, Manifest, build_manifest
from umm.net.errors import NetError
from umm.net.proto import umm_checkpoint_pb2 as pb
from umm.net.proto import umm_checkpoint_pb2_grpc as pb_grpc
from umm.net.ratewatch import RateWatchdog
from umm.net.store import ModelStore
from umm.net.wire import RawChunk

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
# Messages carry one chunk plus a few bytes of framing; both sides allow this much.
MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_MAX_STREAMS_PER_PEER = 8
DEFAULT_SEND_TIMEOUT = 30.0  # seconds: the window over which a client must read min_rate bytes/s
DEFAULT_SEND_MIN_RATE = 16 << 10  # bytes/s
_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NOFOLLOW_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)  # no FIFO wait

Identity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def open_nofollow(root: Path, rel: str) -> int:
    """A read-only fd of regular file ``root/rel``, no link followed below ``root``; OSError if not.

    Each component of ``rel`` is opened relative to its parent's fd with ``O_NOFOLLOW``, so a
    symlink anywhere in the path (a folder or the file itself) fails with ``ELOOP``/``ENOTDIR``
    instead of leading elsewhere, even if it is swapped in while the path is walked.
    """
    parts = rel.split("/")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts[:-1]:
            child = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            os.close(fd)
            fd = child
        child = os.open(parts[-1], _NOFOLLOW_FILE, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(child).st_mode):
        os.close(child)
        raise OSError(f"{rel} is not a regular file")
    return child


def _identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _identities(root: Path, manifest: Manifest) -> dict[str, Identity | None]:
    """What each manifest file is on disk now (None: missing, a link, or not regular)."""
    out: dict[str, Identity | None] = {}
    for e in manifest.files:
        try:
            fd = open_nofollow(root, e.path)
        except OSError:
            out[e.path] = None
            continue
        try:
            out[e.path] = _identity(os.fstat(fd))
        finally:
            os.close(fd)
    return out


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (``ipv4:1.2.3.4:5678`` -> ``ipv4:1.2.3.4``)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


@dataclass(frozen=True)
class ServedModel:
    root: Path
    manifest: Manifest
    manifest_json: bytes
    entries: dict[str, FileEntry]
    identities: dict[str, Identity | None]  # each file as registered (see module docstring)


def _serialize_chunk(chunk: RawChunk | pb.FileChunk) -> bytes:
    return chunk.raw if isinstance(chunk, RawChunk) else chunk.SerializeToString()


def _served(root: Path, manifest: Manifest) -> ServedModel:
    return ServedModel(root, manifest, manifest.canonical_json(), {e.path: e for e in manifest.files},
                       _identities(root, manifest))


class CheckpointServicer(pb_grpc.CheckpointServiceServicer):
    """Answers GetManifest/ReadFile for models in ``store`` and in folders given to :meth:`register_folder`."""

    def __init__(self, store: ModelStore | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_streams_per_peer: int = DEFAULT_MAX_STREAMS_PER_PEER,
                 send_timeout: float = DEFAULT_SEND_TIMEOUT, min_rate: float = DEFAULT_SEND_MIN_RATE):
        if not 1 <= chunk_size <= MAX_MESSAGE_BYTES - 1024:
            raise ValueError(f"chunk_size must be in [1, {MAX_MESSAGE_BYTES - 1024}]")
        if max_streams_per_peer < 1 or send_timeout <= 0 or min_rate <= 0:
            raise ValueError("max_streams_per_peer must be >= 1, send_timeout and min_rate > 0")
        self.store = store
        self.chunk_size = chunk_size
        self.max_streams_per_peer = max_streams_per_peer
        self.send_timeout = send_timeout
        self.min_rate = min_rate
        self._folders: dict[str, ServedModel] = {}
        self._store_cache: dict[str, ServedModel] = {}
        self._streams: dict[str, int] = {}  # open ReadFile streams per peer host
        self._watchdog: RateWatchdog | None = None
        self._lock = threading.Lock()

    def register_folder(self, folder: str | os.PathLike[str], manifest: Manifest | None = None) -> str:
        """Serve ``folder`` (hashed now unless ``manifest`` is given); returns its manifest hash."""
        root = Path(folder).resolve()
        manifest = manifest if manifest is not None else build_manifest(root)
        with self._lock:
            self._folders[manifest.hash] = _served(root, manifest)
        logger.info("serving %s as %s", root, manifest.hash[:12])
        return manifest.hash

    def close(self) -> None:
        """Stop the thread that watches streams (started again by the next ReadFile)."""
        with self._lock:
            watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.close()

    def _watch(self) -> RateWatchdog:
        with self._lock:
            if self._watchdog is None:
                self._watchdog = RateWatchdog(self.send_timeout, self.min_rate, name="umm-serve-watchdog")
            return self._watchdog

    @contextlib.contextmanager
    def _stream_slot(self, context: grpc.ServicerContext):
        """Hold one of the peer's ``max_streams_per_peer`` stream slots; RESOURCE_EXHAUSTED if none."""
        host = peer_host(context.peer())
        with self._lock:
            if self._streams.get(host, 0) >= self.max_streams_per_peer:
                busy = True
            else:
                busy = False
                self._streams[host] = self._streams.get(host, 0) + 1
        if busy:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{host} already has {self.max_streams_per_peer} streams open here; try again later")
        try:
            yield
        finally:
            with self._lock:
                left = self._streams[host] - 1
                if left:
                    self._streams[host] = left
                else:
                    del self._streams[host]

    def unregister(self, manifest_hash: str) -> None:
        with self._lock:
            self._folders.pop(manifest_hash, None)

    def served_hashes(self) -> list[str]:
        with self._lock:
            hashes = set(self._folders)
        if self.store is not None:
            hashes.update(self.store.list())
        return sorted(hashes)

    def lookup(self, manifest_hash: str) -> ServedModel | None:
        with self._lock:
            model = self._folders.get(manifest_hash)
            if model is not None:
                return model
            model = self._store_cache.get(manifest_hash)
        if self.store is None:
            return None
        try:
            if not self.store.has(manifest_hash):
                return None
            if model is None:
                model = _served(self.store.path(manifest_hash), self.store.manifest(manifest_hash))
                with self._lock:
                    self._store_cache[manifest_hash] = model
            return model
        except (NetError, ValueError, OSError):
            return None

    # RPCs -------------------------------------------------------------------------------------
    def GetManifest(self, request: pb.GetManifestRequest | _Malformed,
                    context: grpc.ServicerContext) -> pb.GetManifestResponse:
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed GetManifestRequest")
        model = self.lookup(request.manifest_hash)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.manifest_hash[:16]!r} is not served here")
        return pb.GetManifestResponse(manifest_json=model.manifest_json)

    def ReadFile(self, request: pb.ReadFileRequest | _Malformed, context: grpc.ServicerContext):
        if isinstance(request, _Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed ReadFileRequest")
        model = self.lookup(request.manifest_hash)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.manifest_hash[:16]!r} is not served here")
        entry = model.entries.get(request.path)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"{request.path!r} is not a file of model {request.manifest_hash[:12]}")
        offset = request.offset
        if offset > entry.size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {offset} is past the end of {entry.path} ({entry.size} bytes)")
        end = entry.size if request.length == 0 else min(entry.size, offset + request.length)
        with self._stream_slot(context):
            fd = self._open_registered(model, entry, context)
            watchdog = self._watch()
            watchdog.watch(context, end - offset)
            try:
                while offset < end and context.is_active():
                    data = os.pread(fd, min(self.chunk_size, end - offset), offset)
                    if not data:  # the file shrank on disk: the client resumes elsewhere
                        context.abort(grpc.StatusCode.DATA_LOSS,
                                      f"{entry.path} is shorter on disk than in its manifest")
                    yield RawChunk(offset, data)  # returns once the client took it (flow control)
                    watchdog.got(context, len(data))
                    offset += len(data)
            finally:
                why = watchdog.forget(context)
                os.close(fd)
                if why is not None:
                    logger.info("cancelled a stream of %s to %s: the client %s", entry.path, context.peer(), why)

    def _open_registered(self, model: ServedModel, entry: FileEntry, context: grpc.ServicerContext) -> int:
        """fd of ``entry`` if it is still the file registered (see module docstring), else abort."""
        try:
            fd = open_nofollow(model.root, entry.path)
        except OSError as e:
            logger.warning("cannot open %s without following links: %s", model.root / entry.path, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{entry.path} cannot be read on this peer")
        registered = model.identities.get(entry.path)
        if registered is None or _identity(os.fstat(fd)) != registered:
            os.close(fd)
            logger.warning("%s is not the file registered as %s of %s; not serving it",
                           model.root / entry.path, entry.path, model.manifest.hash[:12])
            context.abort(grpc.StatusCode.DATA_LOSS, f"{entry.path} changed on this peer since it was registered")
        return fd


class _Malformed:
    """Stands for request bytes that did not parse (gRPC itself treats None as a failure)."""


MALFORMED = _Malformed()


def _lenient(message: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    """A request deserializer that answers :data:`MALFORMED` for bytes that do not parse (the RPC
    then says INVALID_ARGUMENT) instead of raising inside gRPC (a logged traceback and INTERNAL)."""

    def parse(raw: bytes) -> Message | _Malformed:
        try:
            return message.FromString(raw)
        except DecodeError:
            return MALFORMED

    return parse


def _add_servicer(servicer: CheckpointServicer, server: grpc.Server) -> None:
    """``pb_grpc.add_CheckpointServiceServicer_to_server``, with ReadFile sending :class:`RawChunk` bytes."""
    handlers = {
        "GetManifest": grpc.unary_unary_rpc_method_handler(
            servicer.GetManifest,
            request_deserializer=_lenient(pb.GetManifestRequest),
            response_serializer=pb.GetManifestResponse.SerializeToString,
        ),
        "ReadFile": grpc.unary_stream_rpc_method_handler(
            servicer.ReadFile,
            request_deserializer=_lenient(pb.ReadFileRequest),
            response_serializer=_serialize_chunk,
        ),
    }
    name = pb.DESCRIPTOR.services_by_name["CheckpointService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class CheckpointServer:
    """A running gRPC server for a :class:`CheckpointServicer` (context manager; ``stop()`` when done)."""

    def __init__(
        self,
        servicer: CheckpointServicer | None = None,
        *,
        store: ModelStore | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_workers: int = 32,
    ):
        self.servicer = servicer if servicer is not None else CheckpointServicer(store)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="umm-ckpt"),
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", 1 << 20),
            ],
            maximum_concurrent_rpcs=max_workers * 4,
        )
        _add_servicer(self.servicer, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise NetError(f"cannot listen on {host}:{port} (address in use or not available)")
        self.host, self.port = host, bound
        self._server.start()
        logger.info("checkpoint service listening on %s", self.address)

    @property
    def address(self) -> str:
        """``host:port`` for clients (and for DHT records)."""
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self._server.stop(grace).wait(timeout=(grace or 0) + 10.0)
        self.servicer.close()

    def __enter__(self) -> CheckpointServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


