"""gRPC ``CheckpointService``: serves complete models from a store and/or registered folders.

Only files listed in a model's manifest are served (by exact manifest path), never anything
else under the folder. Files are read as they are on disk: a file changed after registration
makes clients fail their sha256 check and move on to another provider, so register folders that
do not change (or serve from a :class:`~umm.net.store.ModelStore`).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from umm.checkpoints.manifest import FileEntry, Manifest, build_manifest
from umm.net.errors import NetError
from umm.net.proto import umm_checkpoint_pb2 as pb
from umm.net.proto import umm_checkpoint_pb2_grpc as pb_grpc
from umm.net.store import ModelStore

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1 << 20
# Messages carry one chunk plus a few bytes of framing; both sides allow this much.
MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class ServedModel:
    root: Path
    manifest: Manifest
    manifest_json: bytes
    entries: dict[str, FileEntry]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class RawChunk:
    """A ``FileChunk`` already serialized, as :meth:`CheckpointServicer.ReadFile` yields it.

    Reads like a ``pb.FileChunk`` (``offset``, ``data``); building the wire bytes once from the
    bytes read saves protobuf's copies of every byte sent (ReadFile may also yield ``pb.FileChunk``).
    """

    __slots__ = ("offset", "raw", "_start")

    def __init__(self, offset: int, data: bytes):
        # proto3 wire form, as SerializeToString writes it: fields 1 and 2, each only when not empty
        head = (b"\x08" + _varint(offset) if offset else b"") + (b"\x12" + _varint(len(data)) if data else b"")
        self.offset, self.raw, self._start = offset, head + data, len(head)

    @property
    def data(self) -> memoryview:
        return memoryview(self.raw)[self._start :]


def _serialize_chunk(chunk: RawChunk | pb.FileChunk) -> bytes:
    return chunk.raw if isinstance(chunk, RawChunk) else chunk.SerializeToString()


def _served(root: Path, manifest: Manifest) -> ServedModel:
    return ServedModel(root, manifest, manifest.canonical_json(), {e.path: e for e in manifest.files})


class CheckpointServicer(pb_grpc.CheckpointServiceServicer):
    """Answers GetManifest/ReadFile for models in ``store`` and in folders given to :meth:`register_folder`."""

    def __init__(self, store: ModelStore | None = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE):
        if not 1 <= chunk_size <= MAX_MESSAGE_BYTES - 1024:
            raise ValueError(f"chunk_size must be in [1, {MAX_MESSAGE_BYTES - 1024}]")
        self.store = store
        self.chunk_size = chunk_size
        self._folders: dict[str, ServedModel] = {}
        self._store_cache: dict[str, ServedModel] = {}
        self._lock = threading.Lock()

    def register_folder(self, folder: str | os.PathLike[str], manifest: Manifest | None = None) -> str:
        """Serve ``folder`` (hashed now unless ``manifest`` is given); returns its manifest hash."""
        root = Path(folder).resolve()
        manifest = manifest if manifest is not None else build_manifest(root)
        with self._lock:
            self._folders[manifest.hash] = _served(root, manifest)
        logger.info("serving %s as %s", root, manifest.hash[:12])
        return manifest.hash

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
    def GetManifest(self, request: pb.GetManifestRequest, context: grpc.ServicerContext) -> pb.GetManifestResponse:
        model = self.lookup(request.manifest_hash)
        if model is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.manifest_hash[:16]!r} is not served here")
        return pb.GetManifestResponse(manifest_json=model.manifest_json)

    def ReadFile(self, request: pb.ReadFileRequest, context: grpc.ServicerContext):
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
        try:
            fh = open(model.root / entry.path, "rb", buffering=0)
        except OSError as e:
            logger.warning("cannot open %s: %s", model.root / entry.path, e)
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{entry.path} cannot be read on this peer")
        with fh:
            fd = fh.fileno()
            while offset < end and context.is_active():
                data = os.pread(fd, min(self.chunk_size, end - offset), offset)
                if not data:  # the file shrank on disk: the client resumes elsewhere
                    context.abort(grpc.StatusCode.DATA_LOSS, f"{entry.path} is shorter on disk than in its manifest")
                yield RawChunk(offset, data)
                offset += len(data)


def _add_servicer(servicer: CheckpointServicer, server: grpc.Server) -> None:
    """``pb_grpc.add_CheckpointServiceServicer_to_server``, with ReadFile sending :class:`RawChunk` bytes."""
    handlers = {
        "GetManifest": grpc.unary_unary_rpc_method_handler(
            servicer.GetManifest,
            request_deserializer=pb.GetManifestRequest.FromString,
            response_serializer=pb.GetManifestResponse.SerializeToString,
        ),
        "ReadFile": grpc.unary_stream_rpc_method_handler(
            servicer.ReadFile,
            request_deserializer=pb.ReadFileRequest.FromString,
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
        max_workers: int = 16,
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
        self._server.stop(grace).wait()

    def __enter__(self) -> CheckpointServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


