"""The length-delimited framing that carries protobuf frames on a stream (qserve.wire.framing): the
4-byte big-endian prefix, and `LengthDelimitedReader` fed whole, one byte at a time, in uneven
chunks and with trailing data, bounded in frame size and in its own buffer.
"""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from qserve.wire.framing import LengthDelimitedReader, length_delimited
from qserve.wire.protobuf import DecodeError, decode_frame

from ..helpers.protobuf_frames import EXAMPLE_FRAME, frames


def test_length_delimited_prefix():
    assert length_delimited(b"") == b"\x00\x00\x00\x00"
    assert length_delimited(EXAMPLE_FRAME) == b"\x00\x00\x00\x1a" + EXAMPLE_FRAME
    assert length_delimited(b"x" * 300)[:4] == b"\x00\x00\x01\x2c"


def read_all(reader: LengthDelimitedReader, chunks) -> list[bytes]:
    out = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (frame := reader.next_frame()) is not None:
            out.append(frame)
    return out


def feeds(stream: bytes):
    """The three ways every parser is fed: whole, one byte at a time, and in uneven chunks."""
    yield [stream]
    yield [stream[i:i + 1] for i in range(len(stream))]
    yield [stream[i:i + 7] for i in range(0, len(stream), 7)]


@given(st.lists(frames, max_size=5))
def test_reader_round_trip(items):
    encoded = [f.encode() for f in items]
    stream = b"".join(length_delimited(e) for e in encoded)
    for chunks in feeds(stream):
        reader = LengthDelimitedReader()
        assert read_all(reader, chunks) == encoded
        reader.receive_data(b"")
        assert reader.next_frame() is None and reader.at_eof
    assert [decode_frame(e) for e in encoded] == items


def test_reader_trailing_data():
    stream = length_delimited(EXAMPLE_FRAME) + length_delimited(b"\x08\x07")
    tail = length_delimited(EXAMPLE_FRAME)[:10]
    for chunks in feeds(stream + tail):
        reader = LengthDelimitedReader()
        assert read_all(reader, chunks) == [EXAMPLE_FRAME, b"\x08\x07"]
        assert reader.trailing_data == tail and not reader.at_eof
        reader.receive_data(b"")
        with pytest.raises(DecodeError, match="ended inside a frame"):
            reader.next_frame()


def test_reader_waits_for_header_and_body():
    reader = LengthDelimitedReader()
    assert reader.next_frame() is None
    reader.receive_data(b"\x00\x00")
    assert reader.next_frame() is None
    reader.receive_data(b"\x00\x02\x08")
    assert reader.next_frame() is None and reader.trailing_data == b"\x00\x00\x00\x02\x08"
    reader.receive_data(b"\x01\x00\x00\x00\x00")
    assert reader.next_frame() == b"\x08\x01"
    assert reader.next_frame() == b""  # an all-default frame is an empty body
    assert reader.next_frame() is None and reader.trailing_data == b""


def test_reader_bounds_frame_size():
    reader = LengthDelimitedReader(max_frame_size=4)
    reader.receive_data(length_delimited(b"abcd"))
    assert reader.next_frame() == b"abcd"
    reader.receive_data(b"\x00\x00\x00\x05")  # refused as soon as the prefix is in
    with pytest.raises(ValueError, match="exceeds max_frame_size"):
        reader.next_frame()
    with pytest.raises(DecodeError):
        reader.next_frame()  # and it stays refused


def test_reader_rejects_data_after_eof():
    reader = LengthDelimitedReader()
    reader.receive_data(b"")
    assert reader.next_frame() is None and reader.at_eof
    with pytest.raises(RuntimeError):
        reader.receive_data(b"\x00")


def test_reader_compacts_its_buffer():
    reader = LengthDelimitedReader()
    frame = length_delimited(b"x" * 100)
    for _ in range(1000):
        reader.receive_data(frame)
        assert reader.next_frame() == b"x" * 100
    assert len(reader._buf) < 4 * len(frame)
