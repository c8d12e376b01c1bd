"""QueueLog against a plain in-memory model across random operations, rolls, compaction and reopen."""

from __future__ import annotations

import shutil
import tempfile

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qserve.storage import LogConfig, QueueLog

from ...helpers.storage import Model

RIDS = ["a", "b", "c", "d", "e", "f"]


class LogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="qlog-sm-")
        self.config = LogConfig(segment_bytes=450, compact_live_ratio=0.6)
        self.log = QueueLog.open(self.dir, self.config, now=self.now)
        self.model = Model()
        self.t = 0.0
        self.ts: dict[int, int] = {}

    def now(self) -> float:
        self.t += 0.001
        return self.t

    def teardown(self) -> None:
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(data=st.binary(max_size=120), rid=st.one_of(st.none(), st.sampled_from(RIDS)),
          extra=st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(["1", "2"])),
          priority=st.sampled_from([0, 0, 0, 1, 5, -2]))
    def append(self, data, rid, extra, priority):
        tags = dict(extra)
        if rid is not None:
            tags["requestId"] = rid
        e = self.log.append(data, tags, priority)
        assert e.index == self.model.append(data, tags, priority)
        self.ts[e.index] = e.timestamp_ms

    @precondition(lambda self: self.model.entries)
    @rule(data=st.data(), n=st.integers(1, 4))
    def delete(self, data, n):
        live = sorted(self.model.entries)
        pick = data.draw(st.lists(st.sampled_from(live + [0, self.model.next_index + 3]), max_size=n))
        assert self.log.delete(pick) == self.model.delete(pick)

    @rule(data=st.data())
    def truncate(self, data):
        below = data.draw(st.integers(0, self.model.next_index + 2))
        assert self.log.truncate(below) == self.model.truncate(below)

    @rule(v=st.sampled_from(["End", "Open"]))
    def set_state(self, v):
        self.log.set_state(state=v)
        self.model.state["state"] = v

    @rule()
    def sync(self):
        self.log.sync()
        assert self.log.durable_seq == self.log.appended_seq

    @rule(budget=st.one_of(st.none(), st.integers(1, 2000)))
    def compact(self, budget):
        self.log.maybe_compact(budget)

    @rule()
    def reopen(self):
        self.log.close()
        self.log = QueueLog.open(self.dir, self.config, now=self.now)
        r = self.log.recovery
        assert r.truncated_bytes == 0 and not r.skipped and not r.broken_files

    @invariant()
    def same_as_model(self):
        m, log = self.model, self.log
        live = sorted(m.entries)
        got = [(e.index, e.tags, e.data, e.priority) for e in log.scan()]
        assert got == [(i, *m.entries[i]) for i in live]
        assert all(log.read(i).timestamp_ms == self.ts[i] for i in live)
        # read_many over every index ever used (dead ones read None), out of order too
        asked = list(range(m.next_index + 1)) + live[::-1]
        assert log.read_many(asked) == [log.read(i) for i in asked]
        assert (log.length, log.first_index, log.last_index, log.next_index) == (
            len(live), live[0] if live else 0, live[-1] if live else 0, m.next_index)
        assert list(log.iter_dispatch()) == m.dispatch()
        if live:
            mid = live[len(live) // 2]
            assert list(log.iter_dispatch(mid)) == m.dispatch(mid)
            assert [e.index for e in log.scan(start=mid, limit=2)] == [i for i in live if i >= mid][:2]
        for rid in RIDS:
            want = max((i for i in live if m.entries[i][0].get("requestId") == rid), default=None)
            e = log.find_request_id(rid)
            assert (e.index if e else None) == want
        assert log.state == m.state
        for i in live:
            assert i in log and log.priority_of(i) == m.entries[i][2]


LogMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                        suppress_health_check=[HealthCheck.too_slow])
test_log_machine = LogMachine.TestCase
