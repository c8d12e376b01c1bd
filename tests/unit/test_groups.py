"""Consumer-group core (`qserve.core.groups`), driven synchronously.

The source of entries is `FakeSource`, a small in-memory queue with the same interface the
storage log offers (a real data structure, not a mock). Unit tests pin each rule of the
contract; `GroupMachine` (hypothesis) checks the invariants against a simple model across random
attach/detach/poll/sent/commit/negative/delete/truncate/put sequences.
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qserve.core.group_state import TRANSITIONS, EntryEvent, EntryState, step
from qserve.core.errors import BadRequest
from qserve.core.events import ConsumerSpec
from qserve.core.groups import Dispatcher
from qserve.wire.durations import format_go_duration

from ..helpers.sources import FakeSource


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make(n: int = 0, **tags: str) -> tuple[FakeSource, Dispatcher, Clock]:
    source, clock = FakeSource(), Clock()
    for _ in range(n):
        source.put(**tags)
    return source, Dispatcher(source, now=clock), clock


def spec(group: str = "g", user: str = "u", **kw) -> ConsumerSpec:
    return ConsumerSpec(group, user, **kw)


def commit(source: FakeSource, d: Dispatcher, indexes) -> list[int]:
    """What the edge does for an HTTP commit: delete on storage, then tell the dispatcher."""
    source.delete(indexes)
    return d.commit(indexes)


# -- ConsumerSpec ------------------------------------------------------------------------------

def test_spec_id_and_defaults():
    s = ConsumerSpec("grp", "u.1")
    assert s.id == "grp.u.1"
    assert (s.window, s.auto_commit, s.start, s.tags) == (10, False, 0, ())


@pytest.mark.parametrize("kw", [
    dict(group=""), dict(user=""), dict(window=0), dict(window=-3), dict(window=True),
    dict(window=2.0), dict(start=-2), dict(start="0"), dict(auto_commit="yes"),
    dict(tags=(("k",),)), dict(tags=(("k", 1),)), dict(tags=(("k", "a"), ("k", "b"))),
])
def test_spec_rejects_bad_values(kw):
    args = dict(group="g", user="u") | kw
    with pytest.raises(BadRequest):
        ConsumerSpec(**args)


def test_spec_normalises_tags():
    a = ConsumerSpec("g", "u", tags=(("b", "2"), ("a", "1"), ("a", "1")))
    b = ConsumerSpec("g", "u", tags={"a": "1", "b": "2"})
    assert a.tags == b.tags == (("a", "1"), ("b", "2"))
    assert a == b


# -- state machine table -----------------------------------------------------------------------

def test_transition_table():
    assert step(EntryState.AVAILABLE, EntryEvent.DELIVER) is EntryState.PENDING
    assert step(EntryState.PENDING, EntryEvent.NEGATIVE) is EntryState.AVAILABLE
    assert step(EntryState.PENDING, EntryEvent.DETACH) is EntryState.AVAILABLE
    assert step(EntryState.PENDING, EntryEvent.REMOVE) is EntryState.GONE
    assert step(EntryState.AVAILABLE, EntryEvent.REMOVE) is EntryState.GONE
    for state in EntryState:
        for event in EntryEvent:
            if (state, event) not in TRANSITIONS:
                with pytest.raises(RuntimeError):
                    step(state, event)
    with pytest.raises(RuntimeError):
        step(EntryState.PENDING, EntryEvent.DELIVER)  # never double-dispatch in a group


# -- window, split, groups ---------------------------------------------------------------------

def test_window_is_respected_and_commit_frees_slots():
    source, d, _ = make(25)
    d.attach(spec(window=10))
    assert d.poll("g.u") == list(range(1, 11))
    assert d.poll("g.u") == []
    assert d.wants() == []
    assert commit(source, d, [2, 3]) == [2, 3]
    assert d.wants() == ["g.u"]
    assert d.poll("g.u", max_items=1) == [11]
    assert d.poll("g.u") == [12]
    assert d.poll("g.u") == []
    assert d.pending_of("g.u") == set(range(1, 13)) - {2, 3}
    with pytest.raises(ValueError):
        d.poll("g.u", max_items=-1)
    assert d.poll("g.u", max_items=0) == []


def test_group_members_split_without_overlap():
    _, d, _ = make(10)
    d.attach(spec(user="a", window=3))
    d.attach(spec(user="b", window=3))
    a, b = d.poll("g.a"), d.poll("g.b")
    assert a == [1, 2, 3] and b == [4, 5, 6]
    d.attach(spec(user="c", window=10))
    assert d.poll("g.c") == [7, 8, 9, 10]


def test_each_group_sees_every_entry():
    source, d, _ = make(4)
    d.attach(spec("g1", "a"))
    d.attach(spec("g2", "a"))
    assert d.poll("g1.a") == [1, 2, 3, 4]
    assert d.poll("g2.a") == [1, 2, 3, 4]
    # a commit deletes the entry from the queue: every group stops holding it
    assert commit(source, d, [1]) == [1]
    assert d.pending_of("g1.a") == d.pending_of("g2.a") == {2, 3, 4}


def test_reattach_replaces_and_releases():
    _, d, _ = make(5)
    assert d.attach(spec(window=3)) == []
    assert d.poll("g.u") == [1, 2, 3]
    assert d.attach(spec(window=2)) == [1, 2, 3]
    assert d.consumers() == ["g.u"]
    assert d.pending_of("g.u") == set()
    assert d.poll("g.u") == [1, 2]   # the new connection gets them again, new window


def test_detach_releases_to_other_members_and_same_id():
    _, d, _ = make(6)
    d.attach(spec(user="a", window=3))
    d.attach(spec(user="b", window=10))
    assert d.poll("g.a") == [1, 2, 3]
    assert d.poll("g.b") == [4, 5, 6]
    assert d.detach("g.a") == [1, 2, 3]
    assert d.detach("g.a") == []            # idempotent
    assert d.detach("nobody.x") == []
    assert d.poll("g.a") == []              # not attached: gets nothing
    assert d.poll("g.b") == [1, 2, 3]
    d.detach("g.b")
    d.attach(spec(user="b"))
    assert d.poll("g.b") == [1, 2, 3, 4, 5, 6]  # same id after reconnect


# -- negative commits --------------------------------------------------------------------------

def test_negative_prefers_another_consumer_and_carries_annotations():
    _, d, _ = make(3)
    d.attach(spec(user="a", window=2))
    d.attach(spec(user="b", window=2))
    assert d.poll("g.a") == [1, 2]
    assert d.poll("g.b") == [3]
    assert d.negative([1], "Shutdown", "bye") == [1]
    assert d.annotations(1) == {"lastCode": "Shutdown", "lastReason": "bye"}
    assert d.nack_count(1) == 1
    assert d.poll("g.a") == []          # b has a free slot: it goes there first
    assert d.poll("g.b") == [1]
    assert d.annotations(1) == {"lastCode": "Shutdown", "lastReason": "bye"}  # kept until removed
    assert d.annotations(2) == {}


def test_negative_comes_back_when_alone():
    _, d, _ = make(2)
    d.attach(spec(window=1))
    assert d.poll("g.u") == [1]
    assert d.negative([1], "500", "boom") == [1]
    assert d.poll("g.u") == [1]
    assert d.negative([1], "503", "again") == [1]
    assert d.nack_count(1) == 2
    assert d.annotations(1) == {"lastCode": "503", "lastReason": "again"}


def test_negative_comes_back_when_others_cannot_take_it():
    source, d, _ = make(3)
    source.put(kind="x")                                  # 4
    d.attach(spec(user="a", window=2))
    d.attach(spec(user="b", window=1))
    d.attach(spec(user="c", window=5, tags=(("kind", "x"),)))
    assert d.poll("g.a") == [1, 2]
    assert d.poll("g.b") == [3]                           # b is full
    assert d.poll("g.c") == [4]
    d.negative([1])
    assert d.poll("g.a") == [1]                           # b full, c's filter rejects 1


def test_negative_retry_counts_once_and_unknown_is_ignored():
    _, d, _ = make(1)
    d.attach(spec())
    d.poll("g.u")
    assert d.negative([1, 99, 0], "C", "r") == [1]
    assert d.negative([1], "C", "r") == []
    assert d.nack_count(1) == 1
    assert d.negative([]) == []


def test_negative_scoped_to_one_group():
    _, d, _ = make(1)
    d.attach(spec("g1", "a"))
    d.attach(spec("g2", "a"))
    d.poll("g1.a"), d.poll("g2.a")
    assert d.negative([1], "C", "r", group="g2") == [1]
    assert d.pending_of("g1.a") == {1}
    assert d.pending_of("g2.a") == set()
    assert d.negative([1], group="nope") == []


def test_annotations_dropped_on_removal_and_swept_when_unreported():
    source, d, _ = make(200)
    d.attach(spec(window=200))
    d.poll("g.u")
    d.negative([1, 2], "C", "r")
    d.removed([1])
    assert d.annotations(1) == {} and d.annotations(2) == {"lastCode": "C", "lastReason": "r"}
    # deletions the edge never reports are swept once the table doubles
    source.delete(range(2, 101))
    d.negative(range(101, 201), "C", "r")
    assert d.statistics()["annotated"] == 100
    assert all(d.annotations(i) for i in range(101, 201))


# -- order, start position, filter -------------------------------------------------------------

def test_priority_first_then_fifo():
    source, d, _ = make()
    for priority in (0, 1, 0, 2, 1):
        source.put(priority)
    d.attach(spec())
    assert d.poll("g.u") == [4, 2, 5, 1, 3]


def test_start_latest_and_from_index():
    source, d, _ = make(2)
    d.attach(spec(user="new", start=-1))
    d.attach(spec(user="from2", start=2))
    d.attach(spec("h", "all", start=0))
    assert d.poll("g.new") == []
    source.put()                                          # 3
    assert d.poll("g.new") == [3]
    assert d.poll("g.from2") == [2]                       # 3 is pending at g.new
    assert d.poll("h.all") == [1, 2, 3]


def test_tag_filter():
    source, d, _ = make()
    source.put(a="1", b="2")
    source.put(a="1")
    source.put(a="2", b="2")
    d.attach(spec(user="x", tags=(("a", "1"),)))
    d.attach(spec(user="y", tags=(("b", "2"), ("a", "1"))))
    assert d.poll("g.y") == [1]
    assert d.poll("g.x") == [2]
    d.attach(spec(user="z", tags=(("c", "1"),)))
    assert d.poll("g.z") == []


# -- auto-commit -------------------------------------------------------------------------------

def test_auto_commit_window_bounds_in_flight():
    source, d, _ = make(5)
    d.attach(spec(window=2, auto_commit=True))
    assert d.poll("g.u") == [1, 2]
    assert d.in_flight_of("g.u") == {1, 2}
    assert d.poll("g.u") == []
    # the edge deletes before it sends: removed() alone does not free the slots
    source.delete([1, 2])
    d.removed([1, 2])
    assert d.pending_of("g.u") == set() and d.in_flight_of("g.u") == {1, 2}
    assert d.poll("g.u") == []
    d.sent("g.u", [1])
    assert d.poll("g.u") == [3]
    # the other order works too: sent first, slot freed once removed
    d.sent("g.u", [2, 3])
    assert d.poll("g.u") == [4]
    source.delete([3])
    d.removed([3])
    assert d.poll("g.u") == [5]
    assert d.attributes()["consumers.list.[0]"].startswith("Id: g.u, Index: 5, Pending: 2,")


def test_auto_commit_detach_releases_entries_not_yet_removed():
    source, d, _ = make(3)
    d.attach(spec(user="a", window=2, auto_commit=True))
    d.attach(spec(user="b"))
    assert d.poll("g.a") == [1, 2]
    source.delete([1])
    d.removed([1])
    assert d.detach("g.a") == [2]
    assert d.poll("g.b") == [2, 3]


def test_sent_is_a_noop_for_manual_and_unknown():
    _, d, _ = make(1)
    d.attach(spec(window=1))
    d.poll("g.u")
    d.sent("g.u", [1])
    d.sent("x.y", [1])
    assert d.pending_of("g.u") == {1} and d.poll("g.u") == []


# -- removal and commit ------------------------------------------------------------------------

def test_commit_returns_only_pending_and_is_idempotent():
    source, d, clock = make(3)
    d.attach(spec())
    d.poll("g.u", max_items=2)
    clock.t += 5
    assert commit(source, d, [2, 3, 7]) == [2]
    assert commit(source, d, [2]) == []
    assert "Idle: 0s" in d.attributes()["consumers.list.[0]"]   # commit restarts Idle
    assert d.pending_of("g.u") == {1}


def test_truncate_with_a_range():
    source, d, _ = make(10)
    d.attach(spec(window=4))
    d.poll("g.u")
    d.negative([4], "C", "r")
    source.delete(range(1, 6))
    d.removed(range(1, 6))
    assert d.pending_of("g.u") == set()
    assert d.annotations(4) == {}
    assert d.poll("g.u") == [6, 7, 8, 9]
    d.removed(range(1, 10**12))   # cost bounded by the state kept, not the range
    assert d.pending_of("g.u") == set()


# -- search ------------------------------------------------------------------------------------

def test_search_figures():
    source, d, _ = make()
    for priority in (0, 0, 1, 0, 0):
        source.put(priority)                   # dispatch order: 3, 1, 2, 4, 5
    d.attach(spec("g1", "a", window=1))
    d.attach(spec("g2", "a", window=1))
    assert d.search(5) == {"IsPending": False, "WaitCount": 4}
    assert d.search(3) == {"IsPending": False, "WaitCount": 0}
    assert d.poll("g1.a") == [3]
    assert d.poll("g2.a") == [3]
    d.negative([3], group="g2")
    d.attach(spec("g2", "b", window=1))
    assert d.poll("g2.b") == [3]   # a nacked it; b is the other member with a free slot
    assert d.poll("g2.a") == [1]
    assert d.search(3) == {"IsPending": True, "WaitCount": 0}
    assert d.search(1) == {"IsPending": True, "WaitCount": 0}   # pending in g2
    assert d.search(2) == {"IsPending": False, "WaitCount": 0}
    assert d.search(5) == {"IsPending": False, "WaitCount": 2}  # 2 and 4 wait ahead
    assert d.search(6) is None and d.search(0) is None and d.search(-1) is None
    source.delete([2])
    d.removed([2])
    assert d.search(2) is None
    assert d.search(5) == {"IsPending": False, "WaitCount": 1}


# -- attributes and statistics -----------------------------------------------------------------

def test_attributes_format():
    source, d, clock = make(4)
    assert d.attributes() == {"consumers.stats.total": "0", "consumers.status.total": "0"}
    d.attach(spec("svc", "pod-b", window=5, auto_commit=True))
    d.attach(spec("svc", "pod-a", window=2))
    d.attach(spec("other", "x"))
    assert d.poll("svc.pod-a") == [1, 2]
    assert d.poll("svc.pod-b", max_items=1) == [3]
    clock.t += 19.9974
    assert d.attributes() == {
        "consumers.stats.total": "3",
        "consumers.status.total": "3",
        "consumers.list.[0]": "Id: other.x, Index: 0, Pending: 0, Status: Running, Idle: 19.997s, "
                              "Window: 10, Slots: 10, AutoCommit: false",
        "consumers.list.[1]": "Id: svc.pod-a, Index: 2, Pending: 2, Status: Running, Idle: 19.997s, "
                              "Window: 2, Slots: 0, AutoCommit: false",
        "consumers.list.[2]": "Id: svc.pod-b, Index: 3, Pending: 1, Status: Running, Idle: 19.997s, "
                              "Window: 5, Slots: 4, AutoCommit: true",
        "groups.list.[0]": "Id: other, Index: 0, Pending: 0, Delivered: 0, Consumers: 1",
        "groups.list.[1]": "Id: svc, Index: 3, Pending: 3, Delivered: 3, Consumers: 2",
    }
    d.negative([1])
    assert d.poll("svc.pod-b") == [1, 4]
    assert d.attributes()["groups.list.[1]"] == (
        "Id: svc, Index: 4, Pending: 4, Delivered: 5, Consumers: 2")
    assert d.statistics() == {"consumers": 3, "groups": 2, "pending": 4, "in_flight": 3,
                              "annotated": 1, "avoid_hints": 0, "delivered": 5}
    d.detach("other.x")
    assert "groups.list.[1]" not in d.attributes()   # an empty group is dropped


@pytest.mark.parametrize("ns, text", [
    (0, "0s"), (42, "42ns"), (1_500, "1.5µs"), (750_000_000, "750ms"), (1_000_000_000, "1s"),
    (19_997_000_000, "19.997s"), (90_000_000_000, "1m30s"), (3_600_000_000_000, "1h0m0s"),
    (3_723_500_000_000, "1h2m3.5s"), (60_500_000_000, "1m0.5s"), (-2_000_000, "-2ms"),
])
def test_format_go_duration(ns, text):
    assert format_go_duration(ns) == text


def test_wants_lists_consumers_with_free_slots():
    _, d, _ = make(3)
    d.attach(spec(user="a", window=2))
    d.attach(spec(user="b", window=5))
    d.poll("g.a")
    assert d.wants() == ["g.b"]
    d.negative([1])
    assert d.wants() == ["g.a", "g.b"]


# -- cost --------------------------------------------------------------------------------------

def test_poll_cost_does_not_grow_with_queue_length():
    source, d, _ = make(100_000)
    d.attach(spec(window=10))
    assert d.poll("g.u") == list(range(1, 11))
    commit(source, d, [1])
    source.yielded = 0
    assert d.poll("g.u") == [11]
    assert source.yielded <= 12   # 9 pending skipped + the one taken (+1 slack)


def test_tag_filter_reads_each_entry_once():
    """A filtered consumer's polls read each entry's tags once per filter, not once per poll:
    entries that do not match are never passed over again (a per-filter index of matches)."""
    source, d, _ = make(50, kind="a")
    source.put(kind="b")
    d.attach(spec(tags=(("kind", "b"),)))
    source.tag_reads = 0
    assert d.poll("g.u") == [51]
    assert source.tag_reads == 51
    for _ in range(20):                          # polls, puts of both kinds, commits
        source.tag_reads = 0
        source.put(kind="a")
        b = source.put(priority=1, kind="b")
        assert d.poll("g.u") == [b]
        assert source.tag_reads == 2             # only the two new entries
        commit(source, d, [b])
    source.tag_reads = source.yielded = 0
    assert d.poll("g.u") == [] and source.tag_reads == 0
    # deleted matches are noticed when met and skipped from then on
    bs = [source.put(kind="b") for _ in range(5)]
    source.delete(bs[:4])
    assert d.poll("g.u") == [bs[4]]
    # a consumer that comes back (the clients reconnect every few seconds) finds its filter's index
    d.detach("g.u")
    source.tag_reads = 0
    d.attach(spec(user="again", tags=(("kind", "b"),)))
    assert d.poll("g.again") == [51, bs[4]] and source.tag_reads == 0
    source.tag_reads = 0
    d.attach(spec(user="plain"))
    d.poll("g.plain")
    assert source.tag_reads == 0   # no filter: no tag reads


# -- the model-based state machine -------------------------------------------------------------

GROUPS = ("g1", "g2")
USERS = ("u1", "u2", "u3")
FILTERS = ((), (("k", "a"),))


class GroupMachine(RuleBasedStateMachine):
    """Random operations against `Dispatcher`, checked against a simple model of who holds what."""

    def __init__(self) -> None:
        super().__init__()
        self.source = FakeSource()
        self.d = Dispatcher(self.source, now=Clock())
        self.specs: dict[str, ConsumerSpec] = {}
        self.start: dict[str, int] = {}
        self.pending: dict[str, set[int]] = {}
        self.unsent: dict[str, set[int]] = {}
        self.nacked_by: dict[str, set[int]] = {}
        self.gone: set[int] = set()

    # -- helpers --------------------------------------------------------------------------------
    def members(self, group: str) -> list[str]:
        return [cid for cid, s in self.specs.items() if s.group == group]

    def held_in_group(self, group: str) -> set[int]:
        return set().union(*(self.pending[c] for c in self.members(group)))

    def free(self, cid: str) -> int:
        return self.specs[cid].window - len(self.pending[cid] | self.unsent[cid])

    def forget(self, indexes) -> None:
        self.gone |= {i for i in indexes if 0 < i < self.source.next_index}
        for held in self.pending.values():
            held.difference_update(indexes)

    def matches(self, cid: str, index: int) -> bool:
        tags = self.source.tags_of(index) or {}
        return all(tags.get(k) == v for k, v in self.specs[cid].tags)

    # -- rules ----------------------------------------------------------------------------------
    @initialize(n=st.integers(0, 6), data=st.data())
    def fill(self, n, data):
        """Start with some entries and consumers (hypothesis may switch rules off per run)."""
        for i in range(n):
            self.source.put(i % 2, **({"k": "a"} if i % 3 else {}))
        for user in USERS[:data.draw(st.integers(0, 3))]:
            self.attach(data.draw(st.sampled_from(GROUPS)), user, data.draw(st.integers(1, 3)),
                        data.draw(st.booleans()), 0, ())

    @rule(priority=st.integers(0, 2), tag=st.sampled_from([None, "a", "b"]), n=st.integers(1, 3))
    def put(self, priority, tag, n):
        for _ in range(n):
            self.source.put(priority, **({"k": tag} if tag else {}))

    @rule(group=st.sampled_from(GROUPS), user=st.sampled_from(USERS), window=st.integers(1, 3),
          auto=st.booleans(), start=st.sampled_from([0, -1, 3]), tags=st.sampled_from(FILTERS))
    def attach(self, group, user, window, auto, start, tags):
        s = ConsumerSpec(group, user, window=window, auto_commit=auto, start=start, tags=tags)
        expected = sorted(self.pending.get(s.id, ()))
        assert self.d.attach(s) == expected
        self.specs.pop(s.id, None)      # a replaced consumer goes to the end of the attach order
        self.specs[s.id] = s
        self.start[s.id] = self.source.next_index if start == -1 else start
        self.pending[s.id], self.unsent[s.id], self.nacked_by[s.id] = set(), set(), set()

    @precondition(lambda self: self.specs)
    @rule(data=st.data())
    def detach(self, data):
        cid = data.draw(st.sampled_from(sorted(self.specs)))
        assert self.d.detach(cid) == sorted(self.pending.get(cid, ()))
        for table in (self.specs, self.start, self.pending, self.unsent, self.nacked_by):
            table.pop(cid, None)

    @precondition(lambda self: self.specs)
    @rule(data=st.data(), max_items=st.none() | st.integers(0, 3))
    def poll(self, data, max_items):
        self._poll(data.draw(st.sampled_from(sorted(self.specs))), max_items)

    def _poll(self, cid: str, max_items: int | None) -> None:
        s = self.specs[cid]
        free = self.free(cid)
        limit = free if max_items is None else min(free, max_items)
        order = self.source.live()
        held = self.held_in_group(s.group)
        eligible = [i for i in order if i not in held and i >= self.start[cid] and self.matches(cid, i)]
        got = self.d.poll(cid, max_items)
        assert len(got) <= max(limit, 0) and len(set(got)) == len(got)
        assert not set(got) & self.gone, "a removed entry was delivered again"
        assert set(got) <= set(eligible), "delivered an entry that was held, filtered or too early"
        positions = [order.index(i) for i in got]
        assert positions == sorted(positions), "not in dispatch order"
        if len(got) < limit:  # only an entry it nacked is held back, and only for another taker
            for index in set(eligible) - set(got):
                assert index in self.nacked_by[cid], "an eligible entry was held back"
                assert any(self.free(other) > 0 and index >= self.start[other]
                           and self.matches(other, index)
                           for other in self.members(s.group) if other != cid), "starved"
        self.pending[cid] |= set(got)
        if s.auto_commit:
            self.unsent[cid] |= set(got)

    @precondition(lambda self: self.specs)
    @rule()
    def poll_all(self):
        """Every consumer polls, as the edge does after a put, commit or nack (`wants()`)."""
        for cid in self.d.wants():
            self._poll(cid, None)

    @precondition(lambda self: any(self.unsent.values()))
    @rule(data=st.data())
    def sent(self, data):
        cid = data.draw(st.sampled_from(sorted(c for c, u in self.unsent.items() if u)))
        done = data.draw(st.sets(st.sampled_from(sorted(self.unsent[cid])), min_size=1))
        self.d.sent(cid, done)
        self.unsent[cid] -= done

    def _pick(self, data) -> list[int]:
        known = sorted(set(self.source.live()) | self.gone) + [0, self.source.next_index]
        held = sorted(set().union(*self.pending.values()))
        pick = st.sampled_from(known) | st.sampled_from(held) if held else st.sampled_from(known)
        return data.draw(st.lists(pick, max_size=4))

    @rule(data=st.data(), kind=st.sampled_from(["commit", "commit", "delete", "truncate"]))
    def remove(self, data, kind):
        """The edge deleted entries on storage: an HTTP commit, a delete, or a truncation."""
        if kind == "truncate":
            indexes = range(1, data.draw(st.integers(1, self.source.next_index + 1)))
            self.source.delete(indexes)
            self.d.removed(indexes)
        elif kind == "delete":
            indexes = self._pick(data)
            self.d.removed(self.source.delete(indexes))
        else:
            indexes = self._pick(data)
            held = set().union(*self.pending.values()) if self.pending else set()
            self.source.delete(indexes)
            assert self.d.commit(indexes) == sorted(held & set(indexes))
        self.forget(indexes)

    @rule(data=st.data(), scope=st.sampled_from(["holder", "all", "other"]))
    def negative(self, data, scope):
        """A nack, mostly of entries a consumer holds, scoped to its group, all, or the other."""
        holders = sorted(c for c, held in self.pending.items() if held)
        indexes = self._pick(data)
        group = None
        if holders:
            cid = data.draw(st.sampled_from(holders))
            indexes += data.draw(st.lists(st.sampled_from(sorted(self.pending[cid])), min_size=1))
            group = {"holder": self.specs[cid].group, "all": None,
                     "other": next(g for g in GROUPS if g != self.specs[cid].group)}[scope]
        holders = [c for c in self.pending if group is None or self.specs[c].group == group]
        expected = set().union(*(self.pending[c] & set(indexes) for c in holders))
        assert self.d.negative(indexes, "Code", "why", group=group) == sorted(expected)
        for cid in holders:
            self.nacked_by[cid] |= self.pending[cid] & set(indexes)
            self.pending[cid] -= set(indexes)
        for index in expected:
            assert self.d.annotations(index) == {"lastCode": "Code", "lastReason": "why"}

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def holdings_match_the_model(self):
        assert self.d.consumers() == list(self.specs)
        for cid in self.specs:
            assert self.d.pending_of(cid) == self.pending[cid]
            assert self.d.in_flight_of(cid) == self.unsent[cid]
            assert self.free(cid) >= 0
            assert not self.pending[cid] & self.gone
        assert self.d.wants() == [cid for cid in self.specs if self.free(cid) > 0]

    @invariant()
    def one_holder_per_group(self):
        for group in GROUPS:
            seen: set[int] = set()
            for cid in self.members(group):
                assert not seen & self.pending[cid]
                seen |= self.pending[cid]

    @invariant()
    def every_live_entry_is_pending_or_deliverable(self):
        live = self.source.live()
        probe = copy.deepcopy(self.d, memo={id(self.source): self.source})  # polls never write it
        for group in GROUPS:
            probe.attach(ConsumerSpec(group, "probe", window=len(live) + 1))
            held = self.held_in_group(group)
            assert probe.poll(f"{group}.probe") == [i for i in live if i not in held]

    @invariant()
    def removed_entries_leave_no_trace(self):
        for index in self.gone:
            assert self.d.annotations(index) == {}
            assert self.d.search(index) is None


TestGroupMachine = GroupMachine.TestCase
TestGroupMachine.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


class _NoRank:
    """A source without ``dispatch_rank``: the dispatcher walks the entries ahead instead."""

    def __init__(self, source) -> None:
        self._source = source

    def __getattr__(self, name):
        if name == "dispatch_rank":
            raise AttributeError(name)
        return getattr(self._source, name)

    def __contains__(self, index) -> bool:
        return index in self._source


@pytest.mark.parametrize("seed", range(12))
def test_search_from_the_logs_rank_matches_the_walk(tmp_path, seed):
    """With the storage log as source, WaitCount comes from the index's live-row count (no priority
    entries) and must equal what walking the dispatch order gives, whatever is deleted or pending."""
    import random

    from qserve.backends.local.queues import LogSource
    from qserve.storage import QueueLog
    rng = random.Random(seed)
    log = QueueLog.open(tmp_path / "q")
    with_priorities = seed % 4 == 3            # then the log declines and the walk answers
    for _ in range(300):
        log.append(b"x", {}, priority=rng.choice([0, 0, 0, 2]) if with_priorities else 0)
    log.delete(rng.sample(range(1, 301), 120))
    source = LogSource(log)
    d = Dispatcher(source, now=Clock())
    for g, u, w in (("g1", "a", 5), ("g1", "b", 3), ("g2", "c", 7)):
        d.attach(ConsumerSpec(g, u, window=w))
        d.poll(f"{g}.{u}")
    log.delete(rng.sample(sorted(d.pending_of("g1.a")), 2))   # deleted while pending, unreported
    for index in range(0, 302):
        fast = d.search(index)
        d._source = _NoRank(source)
        slow = d.search(index)
        d._source = source
        assert fast == slow, (index, fast, slow)
    assert (log.dispatch_rank(log.first_index) is None) == with_priorities
    log.close()
