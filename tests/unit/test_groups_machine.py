"""Consumer-group core (`qserve.core.groups`) against a model: `GroupMachine` (hypothesis) checks
the invariants (holdings match the model, one holder per group, every live entry pending or
deliverable, removed entries leave no trace) across random attach/detach/poll/sent/commit/negative/
delete/truncate/put sequences over a `FakeSource`.
"""

from __future__ import annotations

import copy

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from qserve.core.events import ConsumerSpec
from qserve.core.groups import Dispatcher

from ..helpers.dispatch import Clock
from ..helpers.sources import FakeSource


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
