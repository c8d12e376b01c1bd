"""The record codec and the file reader's three outcomes."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from qserve.storage import iter_records, parse_segment_name, segment_name
import msgpack

from qserve.storage.record import (ENTRY, HEADER_SIZE, CheckpointRecord, DeleteRecord, EntryRecord, ReadOutcome,
                            StateRecord, TruncateRecord, decode_body, decode_entry, decode_frame,
                            encode_checkpoint, encode_delete, encode_entry, encode_state, encode_truncate)

tag_text = st.text(max_size=40)
tags = st.dictionaries(tag_text, tag_text, max_size=5)


@given(st.integers(1, 2**63), st.integers(-2**63, 2**63 - 1), st.integers(0, 2**63), tags,
       st.binary(max_size=300), st.booleans(), st.one_of(st.none(), st.text(max_size=300)))
def test_entry_roundtrip(index, prio, ts, tg, data, moved, rid):
    if rid is not None:
        tg = {**tg, "requestId": rid}
    rec = encode_entry(index, prio, ts, tg, data, moved)
    r, end = decode_frame(rec, 0)
    assert end == len(rec)
    assert r == EntryRecord(index, prio, ts, moved, tg, data)
    assert decode_entry(rec[HEADER_SIZE:]) == (index, prio, ts, moved, tg, data)


_GOOD = [ENTRY, 7, 0, 1000, False, "rid", {"a": "b"}, b"data"]


@pytest.mark.parametrize("field, value", [
    (1, True), (1, 0), (1, "7"), (2, 1.5), (3, None), (5, 5), (6, {"a": 1}), (6, {1: "b"}), (6, ["a"]),
    (7, "data"), (0, True),
])
def test_malformed_entry_fields_are_refused(field, value):
    # what a damaged or foreign record could hold: both decoders refuse it with ValueError
    obj = list(_GOOD)
    obj[field] = value
    body = msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(ValueError):
        decode_entry(body)
    with pytest.raises(ValueError):
        decode_body(body)


def test_decode_entry_refuses_other_records():
    good = (7, 0, 1000, False, {"a": "b", "requestId": "rid"}, b"data")
    assert decode_entry(msgpack.packb(_GOOD, use_bin_type=True)) == good
    for rec in (encode_delete([1, 2]), encode_truncate(3), encode_state({"a": "b"})):
        assert not isinstance(decode_body(rec[HEADER_SIZE:]), EntryRecord)
        with pytest.raises(ValueError, match="not an entry record"):
            decode_entry(rec[HEADER_SIZE:])
    with pytest.raises(ValueError, match="undecodable"):
        decode_entry(b"\xc1")


@given(st.lists(st.integers(1, 2**64 - 1), max_size=50), st.integers(0, 2**63),
       st.dictionaries(tag_text, tag_text, max_size=4))
def test_other_records_roundtrip(idx, below, state):
    cp = CheckpointRecord(5, 3, 9, 2, state, (3, 5), "roll", ((3, 100, 12345),))
    blob = encode_delete(idx) + encode_truncate(below) + encode_state(state) + encode_checkpoint(cp)
    got = [r for _, r in iter_records(blob)]
    assert got == [DeleteRecord(tuple(idx)), TruncateRecord(below), StateRecord(state), cp,
                   ReadOutcome("clean", "<bytes>", len(blob), "", len(blob))]


def _three():
    return [encode_entry(i, 0, 1, {"requestId": f"r{i}"}, b"x" * 20) for i in (1, 2, 3)]


def test_clean_torn_corrupt(tmp_path):
    recs = _three()
    blob = b"".join(recs)
    assert [type(r).__name__ for _, r in iter_records(blob)] == ["EntryRecord"] * 3 + ["ReadOutcome"]
    # cut inside the last record at every byte: torn, never corrupt
    for n in range(len(recs[0]) + len(recs[1]) + 1, len(blob)):
        *_, (off, out) = iter_records(blob[:n])
        assert out.kind == "torn" and off == len(recs[0]) + len(recs[1])
    # a flipped byte in the middle record: corrupt (valid data follows) in strict mode...
    bad = bytearray(blob)
    bad[len(recs[0]) + 12] ^= 0xFF
    items = list(iter_records(bytes(bad), path="x.seg"))
    assert items[-1][1].kind == "corrupt" and items[-1][1].offset == len(recs[0])
    assert len(items) == 2
    # ... and the lenient reader skips it and reads the rest
    items = list(iter_records(bytes(bad), lenient=True))
    kinds = [r.kind if isinstance(r, ReadOutcome) else r.index for _, r in items]
    assert kinds == [1, "corrupt", 3, "clean"]
    # a zero-filled tail is torn
    *_, (off, out) = iter_records(blob + bytes(100))
    assert out.kind == "torn" and off == len(blob) and "zero" in out.reason
    # from a path
    p = tmp_path / "f.seg"
    p.write_bytes(blob)
    assert [off for off, _ in iter_records(p)][:3] == [0, len(recs[0]), len(recs[0]) + len(recs[1])]


def test_segment_names():
    assert segment_name(1) == "00000000000000000001.seg"
    assert parse_segment_name(segment_name(123456789)) == 123456789
    for bad in ("1.seg", "00000000000000000001.seg.broken", "x", "00000000000000000001.seg.tmp"):
        assert parse_segment_name(bad) is None
    with pytest.raises(ValueError):
        segment_name(-1)
