"""Consumer-group core (`qserve.core.groups`), driven synchronously: the contract's rules one test
each.

The source of entries is `FakeSource`, a small in-memory queue with the same interface the storage
log offers (a real data structure, not a mock). Pinned here: `ConsumerSpec`, the entry state table,
windows and the split between group members, negative commits, dispatch order, start position and
tag filter, auto-commit, removal and commit. Search, attributes and cost are in
test_groups_search.py; the model-based state machine is in test_groups_machine.py.
"""

from __future__ import annotations

import pytest

from qserve.core.group_state import TRANSITIONS, EntryEvent, EntryState, step
from qserve.core.errors import BadRequest
from qserve.core.events import ConsumerSpec

from ..helpers.dispatch import commit, make, spec


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


def test_sends_on_append_while_a_manual_consumer_has_a_free_slot():
    """What the group commit asks before it waits for an fsync inline: would an entry appended now
    be a frame at once? Only for a manual-commit consumer with room in its window."""
    source, d, _ = make(2)
    assert not d.sends_on_append()                        # nobody attached
    d.attach(spec(user="a", window=5, auto_commit=True))
    assert not d.sends_on_append()                        # an auto-commit frame waits for its delete
    d.attach(spec(group="m", user="b", window=2))
    assert d.sends_on_append()
    assert d.poll("m.b") == [1, 2]
    assert not d.sends_on_append()                        # its window is full
    assert commit(source, d, [1]) == [1]
    assert d.sends_on_append()                            # a slot again
    d.detach("m.b")
    assert not d.sends_on_append()


def test_upcoming_is_what_poll_hands_out_once_a_full_window_frees_and_changes_nothing():
    """What a manual-commit watch reads ahead while its window is full (`Queue.read_ahead`): the
    next window by poll's order and rules (its tag filter, skipping what other members hold), and
    asking hands out nothing."""
    source, d, _ = make()
    for n in range(9):
        source.put(k="a" if n % 3 else "b")   # 1 b, 2 a, 3 a, 4 b, 5 a, 6 a, 7 b, 8 a, 9 a
    d.attach(spec(user="u", window=2, tags=(("k", "a"),)))
    d.attach(spec(user="w", window=1))
    assert d.upcoming("g.u") == [] and not d.full("g.u")   # room: poll had nothing, nothing ahead
    assert not d.alone("g.u") and not d.alone("g.nobody")
    assert d.upcoming("g.nobody") == [] and not d.full("g.nobody")
    assert d.poll("g.w") == [1]
    assert d.poll("g.u") == [2, 3] and d.full("g.u")
    ahead = d.upcoming("g.u")
    assert ahead == [5, 6] and d.upcoming("g.u") == ahead   # only k=a; asked twice, the same
    assert d.pending_of("g.u") == {2, 3} and d.wants() == []
    assert commit(source, d, [1]) == [1]
    assert d.poll("g.w") == [2 + 2]                        # w takes 4: not u's (a k=b entry)
    assert commit(source, d, [2, 3]) == [2, 3] and not d.full("g.u")
    assert d.poll("g.u") == ahead
    assert d.upcoming("g.u") == [8, 9]
    assert d.upcoming("g.w") == [7]                        # w has no filter: 5 and 6 are u's
    d.detach("g.w")
    assert d.alone("g.u") and not d.alone("g.w")


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
