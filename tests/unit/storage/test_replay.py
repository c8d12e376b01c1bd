"""`storage.replay`: the replay rules, driven by real records through the codec.

The unit tests feed `Replay.apply` the records `iter_records` decodes from segments the codec wrote
(as `qserve log` does); the hypothesis test writes random record sequences as a queue directory and
checks that recovery (runs of plain entries through the fast decoder, the rest one by one), the
`qserve log stats` reading and a plain model of FORMAT.md rule 5 all end in the same state.
"""

from __future__ import annotations

import os
import tempfile
import zlib

from hypothesis import HealthCheck, given, settings, strategies as st

from qserve.storage import FileIO, ReadOutcome, iter_records, segment_name
from qserve.storage.index import DEAD, loc_offset, loc_segment, pack_loc
from qserve.storage.record import (CheckpointRecord, encode_checkpoint, encode_delete, encode_entry,
                                   encode_state, encode_truncate)
from qserve.storage.recovery import recover
from qserve.storage.replay import Replay
from qserve.storage.segment import Tally
from qserve.tools.logtool.scan import Progress, find_queues
from qserve.tools.logtool.cli import queue_stats

UUID = "0f8fad5b-d9cb-469f-a165-70867728950e"   # 36 chars: a str8 requestId, the fast path's case


def header(base: int, segs=(), state=None, next_index: int = 1, trunc: int = 0, seals=()) -> bytes:
    return encode_checkpoint(CheckpointRecord(base, 0, next_index, trunc, dict(state or {}),
                                              tuple(segs), "test", tuple(seals)))


def entry(index: int, priority: int = 0, rid: str | None = None, moved: bool = False,
          data: bytes = b"x") -> bytes:
    tags = {"k": "v"} if rid is None else {"requestId": rid}
    return encode_entry(index, priority, 1000 + index, tags, data, moved=moved)


def replay_of(*segments: bytes) -> Replay:
    """`Replay.apply` over each segment's decoded records (segment id = position), then `finish`."""
    r = Replay()
    for sid, buf in enumerate(segments):
        for off, rec in iter_records(buf):
            if isinstance(rec, ReadOutcome):
                assert rec.kind == "clean", rec
                break
            nxt = off + len(_frame_at(buf, off))
            r.apply(sid, off, nxt - off, rec)
    r.finish()
    return r


def _frame_at(buf: bytes, off: int) -> bytes:
    length = int.from_bytes(buf[off:off + 4], "big")
    return buf[off:off + 8 + length]


def live(r: Replay) -> list[int]:
    ix = r.index
    return [ix.idx[p] for p in ix.iter_live()]


def live_count(r: Replay, sid: int) -> int:
    t = r.tallies.get(sid)   # a segment whose records changed nothing has no tally
    return 0 if t is None else t.live_count


# -- the rules one by one --------------------------------------------------------------------------
def test_entries_and_deletes():
    seg = header(1) + entry(1) + entry(2) + entry(3) + encode_delete([2, 9])
    r = replay_of(seg)
    assert live(r) == [1, 3]
    assert r.next_index == 4
    t = r.tallies[0]
    assert (t.live_count, t.deletes, t.min_index, t.max_index) == (2, 1, 1, 3)
    assert t.live_bytes == len(entry(1)) + len(entry(3))


def test_moved_copy_replaces_the_earlier_one_and_moves_its_bytes():
    a = header(1) + entry(1) + entry(2, data=b"old")
    b = header(5) + entry(5) + entry(2, moved=True, data=b"new!")
    r = replay_of(a, b)
    assert live(r) == [1, 2, 5]
    pos = r.index.pos_of(2)
    assert loc_segment(r.index.loc[pos]) == 1
    assert r.tallies[0].live_count == 1 and r.tallies[1].live_count == 2
    assert r.tallies[1].live_bytes == len(entry(5)) + len(entry(2, moved=True, data=b"new!"))


def test_a_copy_never_resurrects_a_deleted_entry():
    # original still present (a row in the columns)
    a = header(1) + entry(1) + entry(2) + encode_delete([2])
    b = header(5) + entry(2, moved=True)
    r = replay_of(a, b)
    assert live(r) == [1]
    assert live_count(r, 1) == 0
    # original gone (the copy waits in the side table), deleted, then copied again
    c = header(5) + entry(5) + entry(2, moved=True) + encode_delete([2])
    d = header(9) + entry(2, moved=True)
    r = replay_of(c, d)
    assert live(r) == [5]
    assert live_count(r, 0) == 1 and live_count(r, 1) == 0


def test_out_of_order_and_moved_entries_are_merged_in_order():
    seg = header(1) + entry(5) + entry(3, moved=True, priority=2) + entry(7) + entry(4)
    r = replay_of(seg)
    assert list(r.index.idx) == [3, 4, 5, 7]
    assert live(r) == [3, 4, 5, 7]
    assert list(r.index.iter_dispatch()) == [(3, 2), (4, 0), (5, 0), (7, 0)]
    assert r.next_index == 8


def test_truncate_kills_below_and_later_entries_below_the_watermark_are_dead():
    seg = header(1) + entry(1) + entry(2) + entry(4, moved=True) + entry(5) + encode_truncate(5) \
        + entry(3, moved=True) + entry(6)
    r = replay_of(seg)
    assert live(r) == [5, 6]
    assert r.watermark == 5
    assert r.tallies[0].live_count == 2


def test_truncate_is_capped_at_the_next_index():
    r = replay_of(header(1) + entry(1) + entry(2) + encode_truncate(100))
    assert r.watermark == 3 and live(r) == []
    r = replay_of(header(1) + entry(1) + encode_truncate(1))
    assert r.watermark == 1 and live(r) == [1]   # nothing below 1 to kill


def test_state_merges_and_checkpoint_replaces():
    seg = header(1, state={"a": "1"}) + encode_state({"b": "2"}) + encode_state({"a": "3"})
    r = replay_of(seg)
    assert r.state == {"a": "3", "b": "2"}
    seg += encode_checkpoint(CheckpointRecord(1, 0, 10, 0, {"c": "4"}, (1, 7), "compact"))
    r = replay_of(seg)
    assert r.state == {"c": "4"} and r.expected == (1, 7) and r.next_index == 10


def test_checkpoint_truncates_to_its_watermark_and_raises_next():
    seg = header(1) + entry(1) + entry(2) + entry(3)
    seg += encode_checkpoint(CheckpointRecord(1, 0, 2, 3, {}, (1,), "compact"))
    r = replay_of(seg)
    assert live(r) == [3] and r.watermark == 3 and r.next_index == 4


def test_entry_run_decodes_plain_entries_and_stops_at_anything_else():
    body = entry(1, rid=UUID) + entry(2, priority=3) + entry(3, rid=UUID, priority=-1)
    seg = header(1) + body + entry(9, moved=True) + entry(4)
    start = len(header(1))
    r = Replay()
    end = r.entry_run(0, seg, start, verify=True)
    assert end == start + len(body)        # stopped at the moved entry
    assert list(r.index.idx) == [1, 2, 3]
    assert [loc_offset(x) for x in r.index.loc] == [start, start + len(entry(1, rid=UUID)),
                                                    start + len(entry(1, rid=UUID)) + len(entry(2, priority=3))]
    assert {p: list(lv) for p, lv in r.index.levels.items()} == {3: [2], -1: [3]}
    assert r.next_index == 4 and r.tallies[0].live_count == 3
    assert r.tallies[0].live_bytes == len(body)
    ref = replay_of(header(1) + body)
    assert [list(c) for c in (r.index.idx, r.index.loc, r.index.size, r.index.prio, r.index.rh)] == \
        [list(c) for c in (ref.index.idx, ref.index.loc, ref.index.size, ref.index.prio, ref.index.rh)]


def test_entry_run_stops_at_a_short_requestid_a_bad_crc_or_an_old_index():
    short = entry(1, rid="short")          # a fixstr requestId: decoded the general way
    r = Replay()
    assert r.entry_run(0, short, 0, verify=True) == 0
    bad = bytearray(entry(1))
    bad[-1] ^= 0xFF
    assert r.entry_run(0, bytes(bad), 0, verify=True) == 0
    assert r.entry_run(0, bytes(bad), 0, verify=False) == len(bad)   # trusted: the crc is not read
    assert r.entry_run(0, entry(1), 0, verify=True) == 0             # not above the last row
    r.watermark = 10
    assert r.entry_run(0, entry(5), 0, verify=True) == 0             # below the watermark


def test_entry_run_shift_places_rows_where_the_rewritten_file_has_them():
    r = Replay()
    r.entry_run(3, entry(1), 0, verify=True, shift=-20)
    assert r.index.loc[0] == pack_loc(3, 20)


# -- recovery, `qserve log stats` and a plain model agree ------------------------------------------
class Model:
    """FORMAT.md rule 5 the obvious way: the copy that counts per index, and the dead ones."""

    def __init__(self) -> None:
        self.next_index, self.watermark, self.state = 1, 0, {}
        self.rows: dict[int, tuple[int, int]] = {}   # index -> (sid, framed size)
        self.dead: set[int] = set()

    def entry(self, sid: int, size: int, index: int, moved: bool) -> None:
        if index < self.watermark:
            return
        self.next_index = max(self.next_index, index + 1)
        if index not in self.dead and (moved or index not in self.rows):
            self.rows[index] = (sid, size)

    def truncate(self, below: int) -> None:
        if below > self.watermark:
            self.watermark = below
            self.dead |= {i for i in self.rows if i < below}

    def live(self) -> dict[int, tuple[int, int]]:
        return {i: v for i, v in sorted(self.rows.items()) if i not in self.dead}


indexes = st.integers(1, 24)
ops = st.one_of(
    st.tuples(st.just("entry"), indexes, st.integers(-2, 2), st.sampled_from([None, UUID, "r1"]),
              st.booleans()),
    st.tuples(st.just("delete"), st.lists(indexes, min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.integers(0, 30)),
    st.tuples(st.just("state"), st.dictionaries(st.sampled_from("ab"), st.sampled_from(["1", "2", ""]))),
    st.tuples(st.just("checkpoint"), st.integers(1, 30), st.integers(0, 30), st.booleans()),
)


def build(segments: list[list[tuple]], seal: bool) -> tuple[list[bytes], Model]:
    """The files of a queue holding these records (every segment starts with its header; the
    active one's header seals the others when ``seal``), and the model's state after them."""
    bases = [1 + 100 * k for k in range(len(segments))]
    files: list[bytes] = []
    m = Model()
    for sid, (base, seg_ops) in enumerate(zip(bases, segments)):
        seals = [(b, len(f), zlib.crc32(f)) for b, f in zip(bases, files)] if seal else []
        buf = header(base, bases, m.state, m.next_index, m.watermark, seals)
        for op in seg_ops:
            kind = op[0]
            if kind == "entry":
                _, index, prio, rid, moved = op
                if not moved:   # the server appends new indexes only; compaction's copies repeat them
                    index = max(index, m.next_index)
                rec = entry(index, prio, rid, moved)
                m.entry(sid, len(rec), index, moved)
            elif kind == "delete":
                rec = encode_delete(op[1])
                m.dead |= {i for i in op[1] if i in m.rows}
            elif kind == "truncate":
                rec = encode_truncate(op[1])
                m.truncate(min(op[1], m.next_index))
            elif kind == "state":
                rec = encode_state(op[1])
                m.state.update(op[1])
                m.state = {k: v for k, v in m.state.items() if v != ""}   # "" removes a key
            else:
                _, nxt, trunc, keep_state = op
                state = dict(m.state) if keep_state else {"c": str(nxt)}
                rec = encode_checkpoint(CheckpointRecord(base, 0, nxt, trunc, state, tuple(bases), "test"))
                m.next_index = max(m.next_index, nxt)
                m.truncate(trunc)
                m.state = state
            buf += rec
        files.append(buf)
    return files, m


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(ops, max_size=12), min_size=1, max_size=3), st.booleans())
def test_recovery_the_log_tools_and_the_model_agree(segments, seal):
    files, model = build(segments, seal)
    with tempfile.TemporaryDirectory() as d:
        for k, buf in enumerate(files):
            with open(os.path.join(d, segment_name(1 + 100 * k)), "wb") as f:
                f.write(buf)
        # the log tools: every record decoded, then `Replay.apply`
        tool = replay_of(*files)
        stats = queue_stats(find_queues(d)[0], Progress("q", 0, "never"))
        # recovery: plain entry runs through the fast decoder
        rec = recover(d, FileIO())
        try:
            ix = rec.index
            cols = lambda ix: [list(c) for c in (ix.idx, ix.loc, ix.size, ix.prio, ix.rh)]  # noqa: E731
            assert cols(ix) == cols(tool.index)
            assert ix.live == tool.index.live
            assert {p: list(lv) for p, lv in ix.levels.items()} == \
                {p: list(lv) for p, lv in tool.index.levels.items()}
            assert (rec.next_index, rec.watermark, rec.state, rec.expected) == \
                (tool.next_index, tool.watermark, tool.state, tool.expected)
            for seg in rec.segments:
                t = tool.tallies.get(seg.sid, Tally())
                assert (seg.live_count, seg.live_bytes, seg.deletes, seg.min_index, seg.max_index) == \
                    (t.live_count, t.live_bytes, t.deletes, t.min_index, t.max_index)
            # `qserve log stats`
            assert (stats["next_index"], stats["truncate_below"], stats["state"]) == \
                (rec.next_index, rec.watermark, dict(sorted(rec.state.items())))
            assert [(row["live"], row["live_bytes"]) for row in stats["segments"]] == \
                [(s.live_count, s.live_bytes) for s in rec.segments]
            # the model
            got = {ix.idx[p]: (loc_segment(ix.loc[p]), ix.size[p]) for p in ix.iter_live()}
            assert got == model.live()
            assert not any(ix.loc[p] & DEAD for p in ix.iter_live())
            assert (rec.next_index, rec.watermark, rec.state) == (model.next_index, model.watermark,
                                                                  model.state)
        finally:
            for seg in rec.segments:
                seg.close()
