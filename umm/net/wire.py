"""The one hand-written protobuf codec of umm: the ``FileChunk`` message of ``ReadFile``.

Every byte of a model crosses the network inside a ``FileChunk`` (``protos/umm_checkpoint.proto``:
``uint64 offset = 1; bytes data = 2;``). Encoding and decoding it here instead of with protobuf
saves a copy of every byte on each side: the server builds the wire bytes once from the bytes it
read (:class:`RawChunk`), and the client takes ``data`` as a view of the received message
(:func:`parse_chunk`; about a third of the client's receive cost). Everything else goes through
the generated code.

The field numbers and wire types below are checked against the generated message descriptor by
``tests/test_net_wire.py``; change them only together with the ``.proto``.
"""

from __future__ import annotations

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

#: (field number, wire type) of each ``FileChunk`` field
CHUNK_OFFSET = (1, WIRE_VARINT)
CHUNK_DATA = (2, WIRE_LEN)


def _tag(field: tuple[int, int]) -> bytes:
    return encode_varint(field[0] << 3 | field[1])


def encode_varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(raw: bytes, i: int) -> tuple[int, int]:
    """The varint at ``raw[i:]`` and the index after it; ValueError if truncated or too long."""
    value = shift = 0
    while True:
        try:
            b = raw[i]
        except IndexError:
            raise ValueError("varint runs past the message") from None
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")


class RawChunk:
    """A ``FileChunk`` already serialized, as the checkpoint server's ``ReadFile`` yields it.

    Reads like a ``pb.FileChunk`` (``offset``, ``data``); ``raw`` holds exactly the bytes
    ``pb.FileChunk(offset=..., data=...).SerializeToString()`` would (proto3 leaves out a field
    at its default: offset 0, empty data).
    """

    __slots__ = ("offset", "raw", "_start")

    def __init__(self, offset: int, data: bytes):
        head = (_tag(CHUNK_OFFSET) + encode_varint(offset) if offset else b"") + \
            (_tag(CHUNK_DATA) + encode_varint(len(data)) if data else b"")
        self.offset, self.raw, self._start = offset, head + data, len(head)

    @property
    def data(self) -> memoryview:
        return memoryview(self.raw)[self._start :]


def _skip(raw: bytes, i: int, wire: int) -> int:
    """The index after a field of wire type ``wire`` whose value starts at ``raw[i]``."""
    if wire == WIRE_VARINT:
        return decode_varint(raw, i)[1]
    if wire == WIRE_FIXED64:
        return i + 8
    if wire == WIRE_FIXED32:
        return i + 4
    raise ValueError(f"wire type {wire}")


def parse_chunk(raw: bytes) -> tuple[int, memoryview]:
    """``(offset, data)`` of a serialized ``FileChunk``, ``data`` a view of ``raw`` (no copy).

    Unknown fields are skipped as protobuf would; malformed bytes raise ValueError.
    """
    view = memoryview(raw)
    offset, data, i, n = 0, view[:0], 0, len(raw)
    while i < n:
        tag, i = decode_varint(raw, i)
        field = (tag >> 3, tag & 7)
        if field == CHUNK_OFFSET:
            offset, i = decode_varint(raw, i)
        elif field[1] == WIRE_LEN:
            size, i = decode_varint(raw, i)
            if i + size > n:
                raise ValueError("length-delimited field runs past the message")
            if field == CHUNK_DATA:
                data = view[i : i + size]
            i += size
        else:
            i = _skip(raw, i, field[1])
    if i != n:
        raise ValueError("field runs past the message")
    return offset, data
