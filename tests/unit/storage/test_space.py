"""Space: compaction keeps disk use proportional to live data, without resurrecting anything."""

from __future__ import annotations

from qserve.storage import LogConfig, QueueLog

from ...helpers.storage import segments, snapshot


def test_churn_stays_bounded(tmp_path):
    cfg = LogConfig(segment_bytes=4096, compact_live_ratio=0.5)
    log = QueueLog.open(tmp_path, cfg)
    live: list[int] = []
    peak = 0
    for i in range(3000):                 # ~100x what one segment holds
        live.append(log.append(b"p" * 100, {"requestId": f"r{i}"}, priority=i % 4).index)
        if len(live) > 20:                # consumers keep ~20 entries in flight, acking out of order
            victim = live.pop(len(live) // 3)
            assert log.delete([victim]) == [victim]
        if i % 50 == 0:
            log.sync()
            log.maybe_compact()
            peak = max(peak, log.bytes_on_disk)
    log.maybe_compact()
    live_bytes = log.statistics()["live_bytes"]
    # live data is ~20 * 160 bytes; allow for the active segment plus one sparse sealed one per ratio
    assert log.bytes_on_disk <= 3 * cfg.segment_bytes + 4 * live_bytes, log.statistics()
    assert peak <= 6 * cfg.segment_bytes
    assert len(segments(tmp_path)) <= 4
    want = snapshot(log)
    assert [e[0] for e in want["entries"]] == sorted(live)
    log.close()
    log = QueueLog.open(tmp_path, cfg)
    assert snapshot(log) == want
    assert log.find_request_id("r2999").index == 3000


def test_dropped_segment_does_not_resurrect_older_entries(tmp_path):
    cfg = LogConfig(segment_bytes=2048, compact_live_ratio=0.5)
    log = QueueLog.open(tmp_path, cfg)
    old = []
    while len(segments(tmp_path)) == 1:                               # fill the first segment
        old.append(log.append(b"o" * 100, {}).index)
    old.pop()                                                         # that one rolled over
    log.delete([old[0]])               # the DELETE lands in segment 2; segment 1 stays mostly live
    mid = [log.append(b"m" * 100, {}).index for _ in range(30)]       # seals segment 2 and more
    log.delete(mid)                    # segment 2 is now fully dead: it is dropped
    log.sync()
    log.maybe_compact()
    names = [p.name for p in segments(tmp_path)]
    assert names[0] == "00000000000000000001.seg" and len(names) <= 3
    assert old[0] not in log
    want = snapshot(log)
    log.close()
    log = QueueLog.open(tmp_path, cfg)
    assert old[0] not in log, "a dropped segment's DELETE was not carried forward"
    assert snapshot(log) == want
    # now drop the first segment too: still nothing comes back
    log.delete(old[1:7])
    log.maybe_compact()
    want = snapshot(log)
    log.close()
    log = QueueLog.open(tmp_path, cfg)
    assert snapshot(log) == want and [e[0] for e in want["entries"]][:len(old) - 7] == old[7:]
