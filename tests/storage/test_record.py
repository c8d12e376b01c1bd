"""The record codec and the file reader's three outcomes."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from storage import iter_records, parse_segment_name, segment_name
from storage.record import (CheckpointRecord, DeleteRecord, EntryRecord, ReadOutcome, StateRecord,
                            TruncateRecord, decode_frame, encode_checkpoint, encode_delete,
                            encode_entry, encode_state, encode_truncate)

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
