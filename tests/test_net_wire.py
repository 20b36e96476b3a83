"""The hand-written ``FileChunk`` codec (:mod:`umm.net.wire`) against the generated protobuf code."""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import FieldDescriptor

from umm.net import wire
from umm.net.proto import umm_checkpoint_pb2 as pb

# the wire type protobuf uses for each field type the codec knows
WIRE_OF = {FieldDescriptor.TYPE_UINT64: wire.WIRE_VARINT, FieldDescriptor.TYPE_BYTES: wire.WIRE_LEN}
CASES = [(0, b""), (7, b""), (0, b"a"), (5, b"abc"), (300, b"x" * 200), (2**63 + 7, bytes(range(256)) * 300)]


def test_field_numbers_and_wire_types_are_the_protos():
    fields = pb.FileChunk.DESCRIPTOR.fields_by_name
    assert set(fields) == {"offset", "data"}
    for name, (number, wire_type) in (("offset", wire.CHUNK_OFFSET), ("data", wire.CHUNK_DATA)):
        assert fields[name].number == number
        assert WIRE_OF[fields[name].type] == wire_type


@pytest.mark.parametrize("offset, data", CASES)
def test_raw_chunks_are_the_bytes_protobuf_writes_and_reads(offset, data):
    chunk = wire.RawChunk(offset, data)
    assert chunk.raw == pb.FileChunk(offset=offset, data=data).SerializeToString()
    assert (chunk.offset, bytes(chunk.data)) == (offset, data)
    back = pb.FileChunk.FromString(chunk.raw)
    assert (back.offset, back.data) == (offset, data)


@pytest.mark.parametrize("offset, data", CASES)
def test_chunks_are_parsed_like_protobuf_without_copying(offset, data):
    raw = pb.FileChunk(offset=offset, data=data).SerializeToString()
    got_offset, got = wire.parse_chunk(raw)
    assert (got_offset, bytes(got)) == (offset, data)
    assert isinstance(got, memoryview) and (not data or got.obj is raw)  # a view of the received bytes
    assert (lambda o, d: (o, bytes(d)))(*wire.parse_chunk(wire.RawChunk(offset, data).raw)) == (offset, data)


def test_varints_match_protobufs():
    for value in (0, 1, 127, 128, 300, 2**32, 2**64 - 1):
        raw = pb.FileChunk(offset=value).SerializeToString()
        assert raw[1:] == (wire.encode_varint(value) if value else b"")
        assert wire.decode_varint(wire.encode_varint(value), 0) == (value, len(wire.encode_varint(value)))


def test_unknown_fields_of_every_wire_type_are_skipped_as_protobuf_does():
    unknown = bytes([3 << 3 | 0, 0x96, 0x01, 4 << 3 | 1]) + bytes(8) + bytes([5 << 3 | 5]) + bytes(4) + \
        bytes([6 << 3 | 2, 2]) + b"zz"
    raw = unknown + pb.FileChunk(offset=9, data=b"xyz").SerializeToString()
    assert pb.FileChunk.FromString(raw).data == b"xyz"
    assert (lambda o, d: (o, bytes(d)))(*wire.parse_chunk(raw)) == (9, b"xyz")


def test_malformed_chunks_are_refused_and_the_client_drops_their_provider():
    from umm.net.transfer import _BadData, _parse_chunk

    good = pb.FileChunk(offset=300, data=b"hello").SerializeToString()
    for bad in (good[:-1], good[:1], bytes([1 << 3 | 0]) + b"\xff" * 11, bytes([7 << 3 | 3])):
        with pytest.raises(ValueError):
            wire.parse_chunk(bad)
        with pytest.raises(_BadData):
            _parse_chunk(bad)


def test_the_server_sends_raw_chunks_and_plain_messages_alike():
    from umm.net.server import _serialize_chunk

    plain = pb.FileChunk(offset=3, data=b"abc")  # what a subclass's ReadFile may yield instead
    assert _serialize_chunk(plain) == plain.SerializeToString() == _serialize_chunk(wire.RawChunk(3, b"abc"))
