"""qserve.wire.protobuf against the generated classes shipped in the official Python SDK.

Byte equality is asserted against ``SerializeToString()`` of the SDK's pure-Python protobuf
runtime, which writes map entries in insertion order (``deterministic=True`` sorts them). Other
runtimes (upb, cpp) order map entries by hash, so with more than one tag there we only compare
decoded messages. Decoding is checked both ways and differentially on truncated and
unknown-field-laden input. The length-delimited framing around these messages is in
test_protobuf_framing.py.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

pb2 = pytest.importorskip("eas_prediction.queue_types.queueservice_pb2")
from google.protobuf.internal import api_implementation  # noqa: E402

from qserve.wire.protobuf import (DecodeError, Frame, decode_attributes, decode_frame,  # noqa: E402
                                  decode_frame_list, encode_attributes, encode_frame, encode_frame_list)

from ..helpers.protobuf_frames import EXAMPLE_FRAME, U64, frames, tag_dicts  # noqa: E402

INSERTION_ORDERED_MAPS = api_implementation.Type() == "python"


def theirs(frame: Frame):
    msg = pb2.DataFrameProto(index=frame.index, data=frame.data, message=frame.message)
    for k, v in frame.tags.items():
        msg.tags[k] = v
    return msg


def from_theirs(msg) -> Frame:
    return Frame(msg.index, dict(msg.tags), msg.data, msg.message)


def assert_same_bytes(ours: bytes, msg, n_map_items: int) -> None:
    if INSERTION_ORDERED_MAPS or n_map_items <= 1:
        assert ours == msg.SerializeToString()
    else:
        parsed = type(msg)()
        parsed.ParseFromString(ours)
        assert parsed == msg


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# --------------------------------------------------------------------------- PROTOCOL.md examples


def test_protocol_examples():
    frame = encode_frame(1033, {"requestId": "ab"}, b"[{}]")
    assert frame == EXAMPLE_FRAME and len(frame) == 26
    assert encode_frame_list([frame]) == b"\x0a\x1a" + EXAMPLE_FRAME
    assert encode_attributes({"stream.length": "1"}) == b"\x0a\x12\x0a\x0dstream.length\x12\x011"
    assert encode_frame(0, {}, b"") == b""
    assert Frame().encode() == b""


def test_protocol_examples_match_sdk():
    msg = pb2.DataFrameProto(index=1033, data=b"[{}]")
    msg.tags["requestId"] = "ab"
    assert msg.SerializeToString() == EXAMPLE_FRAME
    assert pb2.DataFrameListProto(index=[msg]).SerializeToString() == b"\x0a\x1a" + EXAMPLE_FRAME
    attrs = pb2.AttributesProto()
    attrs.attributes["stream.length"] = "1"
    assert attrs.SerializeToString() == encode_attributes({"stream.length": "1"})
    assert pb2.DataFrameProto().SerializeToString() == b""


def test_decode_examples():
    assert decode_frame(EXAMPLE_FRAME) == Frame(1033, {"requestId": "ab"}, b"[{}]")
    assert decode_frame_list(b"\x0a\x1a" + EXAMPLE_FRAME) == [decode_frame(EXAMPLE_FRAME)]
    assert decode_attributes(b"\x0a\x12\x0a\x0dstream.length\x12\x011") == {"stream.length": "1"}
    assert decode_frame(b"") == Frame()
    assert decode_frame_list(b"") == []
    assert decode_attributes(b"") == {}


# ----------------------------------------------------------------------------- encoding rules

@pytest.mark.parametrize("index", [1, 127, 128, 300, 16383, 16384, 2**32, 2**63, U64])
def test_varint_boundaries_match_sdk(index):
    assert encode_frame(index, {}, b"") == pb2.DataFrameProto(index=index).SerializeToString()


def test_map_entries_always_carry_key_and_value():
    # The SDK writes empty keys and values explicitly inside a map entry; so do we.
    assert encode_frame(0, {"": ""}, b"") == b"\x12\x04\x0a\x00\x12\x00"
    assert encode_frame(0, {"k": ""}, b"") == b"\x12\x05\x0a\x01k\x12\x00"
    msg = pb2.DataFrameProto()
    msg.tags[""] = ""
    msg.tags["k"] = ""
    assert encode_frame(0, {"": "", "k": ""}, b"") == msg.SerializeToString()


def test_map_order_finding():
    """Default serialization keeps insertion order; deterministic=True sorts by key."""
    tags = {"z": "1", "a": "2", "m": "3"}
    msg = theirs(Frame(tags=tags))
    if INSERTION_ORDERED_MAPS:
        assert msg.SerializeToString() == encode_frame(0, tags, b"")
    assert msg.SerializeToString(deterministic=True) == encode_frame(0, dict(sorted(tags.items())), b"")


def test_long_strings_use_multibyte_lengths():
    tags = {"k" * 200: "v" * 20000}
    frame = Frame(5, tags, b"x" * 70000, "m" * 129)
    assert_same_bytes(frame.encode(), theirs(frame), 1)
    assert decode_frame(frame.encode()) == frame


def test_encode_accepts_bytes_like_data():
    assert encode_frame(1, {}, bytearray(b"ab")) == encode_frame(1, {}, memoryview(b"ab")) == b"\x08\x01\x1a\x02ab"


@pytest.mark.parametrize("args, exc", [
    ((-1, {}, b""), ValueError),
    ((2**64, {}, b""), ValueError),
    ((1, {"k": 1}, b""), TypeError),
    ((1, {1: "v"}, b""), TypeError),
    ((1, {"k": "\ud800"}, b""), ValueError),
    ((1, {}, "text"), TypeError),
    ((1, {}, 5), TypeError),
])
def test_encode_rejects(args, exc):
    with pytest.raises(exc):
        encode_frame(*args)


@pytest.mark.parametrize("kwargs", [
    {"index": -1}, {"index": 2**64}, {"index": True}, {"tags": [("a", "b")]}, {"data": "s"},
    {"message": b"m"},
])
def test_frame_validates(kwargs):
    with pytest.raises((TypeError, ValueError)):
        Frame(**kwargs)


def test_attributes_reject_non_string_values():
    with pytest.raises(TypeError):
        encode_attributes({"stream.length": 1})


def test_frame_list_keeps_empty_frames():
    assert encode_frame_list([b"", b""]) == b"\x0a\x00\x0a\x00"
    assert decode_frame_list(b"\x0a\x00\x0a\x00") == [Frame(), Frame()]
    assert pb2.DataFrameListProto(index=[pb2.DataFrameProto()] * 2).SerializeToString() == b"\x0a\x00\x0a\x00"


# -------------------------------------------------------------------------- round trips (hypothesis)

@given(frames)
def test_encode_matches_sdk_bytes(frame):
    ours = encode_frame(frame.index, frame.tags, frame.data, frame.message)
    assert_same_bytes(ours, theirs(frame), len(frame.tags))
    parsed = pb2.DataFrameProto()
    parsed.ParseFromString(ours)
    assert from_theirs(parsed) == frame


@given(frames, st.booleans())
def test_decode_sdk_bytes(frame, deterministic):
    assert decode_frame(theirs(frame).SerializeToString(deterministic=deterministic)) == frame


@given(st.lists(frames, max_size=5))
def test_frame_list_both_ways(items):
    ours = encode_frame_list(f.encode() for f in items)
    msg = pb2.DataFrameListProto(index=[theirs(f) for f in items])
    assert_same_bytes(ours, msg, max((len(f.tags) for f in items), default=0))
    parsed = pb2.DataFrameListProto()
    parsed.ParseFromString(ours)
    assert [from_theirs(m) for m in parsed.index] == items
    assert decode_frame_list(msg.SerializeToString()) == items


@given(tag_dicts, st.booleans())
def test_attributes_both_ways(attrs, deterministic):
    msg = pb2.AttributesProto()
    for k, v in attrs.items():
        msg.attributes[k] = v
    ours = encode_attributes(attrs)
    assert_same_bytes(ours, msg, len(attrs))
    parsed = pb2.AttributesProto()
    parsed.ParseFromString(ours)
    assert dict(parsed.attributes) == attrs
    assert decode_attributes(msg.SerializeToString(deterministic=deterministic)) == attrs


# --------------------------------------------------------------------------------- decoding rules

def unknown_field(number: int, wire: int, draw_bytes: bytes, value: int) -> bytes:
    tag = varint(number << 3 | wire)
    if wire == 0:
        return tag + varint(value)
    if wire == 1:
        return tag + struct.pack("<Q", value & U64)
    if wire == 2:
        return tag + varint(len(draw_bytes)) + draw_bytes
    if wire == 5:
        return tag + struct.pack("<I", value & 0xFFFFFFFF)
    # wire 3: a group holding a varint and a nested group
    return tag + varint(1 << 3) + varint(value) + varint(2 << 3 | 3) + varint(2 << 3 | 4) + varint(number << 3 | 4)


unknown_fields = st.builds(
    unknown_field,
    st.integers(5, 2**29 - 1), st.sampled_from([0, 1, 2, 3, 5]), st.binary(max_size=10), st.integers(0, U64),
)


def split_fields(buf: bytes) -> list[bytes]:
    """Split an encoding of ours into its top-level fields (all tags are one byte)."""
    out, pos = [], 0
    while pos < len(buf):
        start, wire = pos, buf[pos] & 7
        pos += 1
        n, shift = 0, 0
        while True:
            b = buf[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if wire == 2:
            pos += n
        out.append(buf[start:pos])
    return out


@given(frames, st.lists(unknown_fields, max_size=4), st.randoms(use_true_random=False))
def test_any_order_and_unknown_fields(frame, extras, rnd):
    fields = split_fields(frame.encode())
    rnd.shuffle(fields)
    fields += extras
    rnd.shuffle(fields)
    buf = b"".join(fields)
    msg = pb2.DataFrameProto()
    msg.ParseFromString(buf)
    assert decode_frame(buf) == from_theirs(msg)
    # Unknown fields alone cannot change the frame; shuffling can only reorder tags.
    decoded = decode_frame(buf)
    assert (decoded.index, decoded.data, decoded.message) == (frame.index, frame.data, frame.message)
    assert decoded.tags == frame.tags


@given(frames, st.lists(unknown_fields, max_size=3))
def test_truncation_agrees_with_sdk(frame, extras):
    buf = frame.encode() + b"".join(extras)
    for cut in range(len(buf)):
        prefix = buf[:cut]
        msg = pb2.DataFrameProto()
        try:
            msg.ParseFromString(prefix)
        except Exception:
            with pytest.raises(DecodeError):
                decode_frame(prefix)
        else:
            assert decode_frame(prefix) == from_theirs(msg)


@settings(max_examples=300)
@given(st.binary(max_size=40))
def test_garbage_raises_only_decode_error(buf):
    for decode in (decode_frame, decode_frame_list, decode_attributes):
        try:
            decode(buf)
        except DecodeError:
            pass


@pytest.mark.parametrize("buf, expected", [
    (b"\x08\x01\x08\x02", Frame(index=2)),                                      # last scalar wins
    (b"\x1a\x01a\x1a\x01b", Frame(data=b"b")),
    (b"\x12\x06\x0a\x01k\x12\x011\x12\x06\x0a\x01k\x12\x012", Frame(tags={"k": "2"})),  # last key wins
    (b"\x12\x03\x0a\x01k", Frame(tags={"k": ""})),                               # entry without value
    (b"\x12\x03\x12\x01v", Frame(tags={"": "v"})),                               # entry without key
    (b"\x12\x08\x12\x01v\x0a\x01k\x18\x05", Frame(tags={"k": "v"})),             # reordered, unknown inside
    (b"\x0a\x01\x05", Frame()),                                                   # index with wrong wire type
    (b"\x1a\x02ab\x0d\x00\x00\x00\x00", Frame(data=b"ab")),                       # fixed32 on known number
    (b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", Frame(index=U64)),
    (b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", Frame(index=U64)),         # bits past 64 dropped
    (b"\x0b\x08\x01\x0b\x0c\x0c\x08\x07", Frame(index=7)),                       # nested groups skipped
    (b"\x22\x06\xc3\xa9\xe2\x82\xac!", Frame(message="é€!")),
])
def test_decode_rules(buf, expected):
    assert decode_frame(buf) == expected
    msg = pb2.DataFrameProto()
    msg.ParseFromString(buf)
    assert from_theirs(msg) == expected


@pytest.mark.parametrize("buf", [
    b"\x08", b"\x08\x80", b"\x1a\x05abc", b"\x12\x04\x0a\x05k", b"\x12",             # truncated
    b"\x08" + b"\xff" * 10 + b"\x01",                                                  # 11-byte varint
    b"\x00", b"\x80\x00\x00",                                                          # field number 0
    b"\x0e", b"\x0f",                                                                  # wire types 6, 7
    b"\x0c", b"\x08\x01\x0c",                                                          # stray end group
    b"\x0b\x08\x01",                                                                   # unterminated group
    b"\x0b\x14",                                                                       # mismatched end group
    b"\x09\x00\x00", b"\x0d\x00",                                                      # truncated fixed
    b"\x22\x01\xff", b"\x12\x03\x0a\x01\xff", b"\x12\x03\x12\x01\xff",                 # invalid UTF-8
    b"\x22\x03\xed\xa0\x80",                                                           # encoded surrogate
])
def test_decode_rejects(buf):
    with pytest.raises(DecodeError):
        decode_frame(buf)


def test_decode_list_and_attributes_reject():
    with pytest.raises(DecodeError):
        decode_frame_list(b"\x0a\x05\x08\x01")
    with pytest.raises(DecodeError):
        decode_frame_list(b"\x0a\x02\x1a\x05")  # inner frame truncated
    with pytest.raises(DecodeError):
        decode_attributes(b"\x0a\x03\x0a\x01\xff")


def test_decode_accepts_bytes_like():
    expected = decode_frame(EXAMPLE_FRAME)
    assert decode_frame(bytearray(EXAMPLE_FRAME)) == decode_frame(memoryview(EXAMPLE_FRAME)) == expected


def test_decode_list_skips_unknown_fields():
    buf = b"\x10\x01" + b"\x0a\x02\x08\x01" + b"\x12\x00" + b"\x0a\x02\x08\x02"
    assert decode_frame_list(buf) == [Frame(index=1), Frame(index=2)]
