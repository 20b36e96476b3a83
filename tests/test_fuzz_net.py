"""Property-based fuzzing of what peers send: manifests, checkpoint-service requests, addresses.

Whatever the input, only the documented outcome may come out: a :class:`Manifest` or a
:class:`CheckpointError`; a gRPC answer with the file's true bytes, or NOT_FOUND / OUT_OF_RANGE /
INVALID_ARGUMENT (never UNKNOWN or INTERNAL, which is what an exception in the server becomes);
never a byte of a file outside the model's folder.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umm.checkpoints.errors import CheckpointError
from umm.checkpoints.manifest import FileEntry, Manifest, sha256_file
from umm.net.addresses import check_address
from umm.net.errors import AddressError
from umm.net.proto import umm_checkpoint_pb2 as pb
from umm.net.server import CheckpointServer, CheckpointServicer

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEX = "0123456789abcdef"
SECRET = b"SECRET-OUTSIDE-THE-MODEL-ROOT"
U64 = st.integers(min_value=0, max_value=2**64 - 1)

# --- manifests ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
path_parts = st.sampled_from(["a", "b.bin", "..", ".", "", ".git", "c:d", "x\\y", "é", "\x00", "n" * 300, "/"])
paths = st.lists(path_parts, min_size=1, max_size=20).map("/".join) | st.text(max_size=40)
entries = st.fixed_dictionaries({
    "path": paths | json_values,
    "size": st.integers(min_value=-2, max_value=2**70) | json_values,
    "sha256": st.text(HEX, min_size=64, max_size=64) | json_values,
})
manifest_dicts = st.fixed_dictionaries({
    "schema_version": st.sampled_from([1, 1, 1, 2, True, 1.0, "1"]),
    "files": st.lists(entries, max_size=6) | json_values,
})


def _parse(raw: bytes | str) -> None:
    try:
        manifest = Manifest.from_json(raw)
    except CheckpointError:
        return
    again = Manifest.from_json(manifest.canonical_json())  # what parses is stable under its own encoding
    assert again == manifest and again.hash == manifest.hash


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_manifest_or_a_checkpoint_error(raw):
    _parse(raw)


@FUZZ
@given(manifest_dicts | json_values)
def test_arbitrary_json_is_a_manifest_or_a_checkpoint_error(value):
    _parse(json.dumps(value))


@FUZZ
@given(st.lists(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=20).map("/".join), max_size=40))
def test_accepted_manifests_keep_paths_inside_their_folder(names):
    try:
        manifest = Manifest.from_dict({"schema_version": 1,
                                       "files": [{"path": n, "size": 0, "sha256": "0" * 64} for n in names]})
    except CheckpointError:
        return
    root = Path("/model")
    for e in manifest.files:
        assert (root / e.path).resolve().is_relative_to(root) and len(e.path.split("/")) <= 16


# --- addresses ---------------------------------------------------------------------------------


@FUZZ
@given(st.text(string.printable, max_size=40) | st.from_regex(r"[a-z0-9:\[\]./-]{1,30}:[0-9]{1,6}", fullmatch=True))
def test_arbitrary_addresses_are_accepted_as_host_port_or_an_address_error(address):
    try:
        checked = check_address(address)
    except AddressError:
        return
    host, _, port = checked.rpartition(":")
    assert 1 <= int(port) <= 65535 and host and not any(c in host for c in "/@ \t\n")


# --- the checkpoint service --------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "model"
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_bytes(b'{"model_type": "llama"}')
    (root / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 300)
    (root / "empty.txt").write_bytes(b"")
    (base / "secret.txt").write_bytes(SECRET)
    servicer = CheckpointServicer(chunk_size=4096)
    h = servicer.register_folder(root)
    # a manifest that names a link out of the folder: must never be followed
    (root / "link.txt").symlink_to(base / "secret.txt")
    linked = servicer.register_folder(root, Manifest((FileEntry("link.txt", len(SECRET),
                                                                sha256_file(base / "secret.txt")),)))
    server = CheckpointServer(servicer)
    channel = grpc.insecure_channel(server.address)
    method = "/umm.net.v1.CheckpointService/"
    calls = {
        "ReadFile": channel.unary_stream(method + "ReadFile", request_serializer=None, response_deserializer=None),
        "GetManifest": channel.unary_unary(method + "GetManifest", request_serializer=None,
                                           response_deserializer=None),
    }
    files = {p: (root / p).read_bytes() for p in ("config.json", "sub/weights.bin", "empty.txt")}
    yield {"hashes": [h, linked], "files": files, "calls": calls}
    channel.close()
    server.stop(grace=None)


ALLOWED = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.UNAVAILABLE}  # UNAVAILABLE: a manifest file that cannot be opened safely


def _read(served, raw: bytes) -> bytes | None:
    """The bytes ReadFile answers for serialized request ``raw``, or None for an allowed error."""
    try:
        data = b"".join(pb.FileChunk.FromString(c).data for c in served["calls"]["ReadFile"](raw, timeout=30))
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        return None
    assert SECRET not in data
    return data


@FUZZ
@given(data=st.data(), offset=U64 | st.integers(0, 80_000), length=U64 | st.integers(0, 80_000))
def test_read_file_answers_true_bytes_or_a_documented_status(served, data, offset, length):
    h = data.draw(st.sampled_from(served["hashes"]) | st.text(max_size=70), label="hash")
    path = data.draw(st.sampled_from([*served["files"], "link.txt", "../secret.txt", "sub/../config.json",
                                      "/etc/passwd", "sub", "", "config.json\x00"]) | paths, label="path")
    request = pb.ReadFileRequest(manifest_hash=h, path=path, offset=offset, length=length)
    got = _read(served, request.SerializeToString())
    if got is not None:  # only a file of the manifest, from its offset, as much as asked
        full = served["files"][path]
        end = len(full) if length == 0 else min(len(full), offset + length)
        assert h == served["hashes"][0] and got == full[offset:end]


@FUZZ
@given(st.binary(max_size=200))
def test_malformed_request_bytes_are_invalid_argument_or_not_found(served, raw):
    _read(served, raw)
    try:
        reply = served["calls"]["GetManifest"](raw, timeout=30)
    except grpc.RpcError as e:
        assert e.code() in ALLOWED, (e.code(), e.details())
        return
    assert SECRET not in reply
