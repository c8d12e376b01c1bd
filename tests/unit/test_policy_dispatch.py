"""The dispatcher's delivery policies (`core.groups` with a `core.policy.Policy`) against a plain model,
as a hypothesis state machine: random puts, consumers attaching and leaving in two groups, polls,
commits, negative commits with and without delays, and the clock moving, with ``max_deliveries``,
``retry_backoff`` and ``delivery_timeout`` all on. After every step the model's rules hold:

- no entry is held by two members of one group, and no consumer holds more than its window;
- nothing is delivered to a group while its delay runs, nor after it was dead-lettered;
- the deliveries the dispatcher counts per group are the model's (a delivery counts once its frame
  is written: a poll whose socket dies before its frames left counts nothing), and never exceed
  ``max_deliveries``;
- an entry comes back as a dead letter exactly when it returns to a group after ``max_deliveries``
  deliveries, once; nothing is lost: every put entry is live, committed or dead-lettered;
- after `expire()` no delivery older than the timeout is still held, and only those older came back.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qserve.core.events import ConsumerSpec
from qserve.core.groups import Dispatcher
from qserve.core.policy import Policy

from ..helpers.sources import FakeSource

MAX = 3
TIMEOUT = 10.0
BACKOFF = (1.0, 2.0, 4.0)
GROUPS = ("a", "b")
USERS = ("u1", "u2")
WINDOW = 2


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class PolicyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.source = FakeSource()
        self.d = Dispatcher(self.source, now=self.clock,
                            policy=Policy(max_deliveries=MAX, retry_backoff=BACKOFF, delivery_timeout=TIMEOUT))
        self.put_entries: set[int] = set()
        self.committed: set[int] = set()
        self.dead: set[int] = set()           # dead-lettered (and then removed, as the edge does)
        self.counts: dict[tuple[str, int], int] = {}
        self.due: dict[tuple[str, int], float] = {}
        self.held: dict[tuple[str, int], tuple[str, float]] = {}   # (group, index) -> (consumer, since)
        self.attached: set[str] = set()
        self.pending_dead: set[int] = set()   # the model says: a dead letter now

    # -- helpers ----------------------------------------------------------------------------
    def _returned(self, group: str, index: int, delay: float | None) -> None:
        """The model of an entry coming back to its group: a dead letter, or delayed, or at once."""
        count = self.counts.get((group, index), 0)
        if count >= MAX:
            self.pending_dead.add(index)
            return
        if delay is None:   # the backoff after the count-th delivery; none before the first
            wait = min(BACKOFF[2], BACKOFF[0] * BACKOFF[1] ** (count - 1)) if count else 0.0
        else:
            wait = delay
        if wait > 0:
            self.due[(group, index)] = self.clock.now + wait

    def _settle(self) -> None:
        """The edge: take the dead letters (exactly the model's) and remove them from the queue."""
        letters = self.d.dead_letters()
        assert {letter.index for letter in letters} == self.pending_dead
        for letter in letters:
            assert self.counts.get((letter.group, letter.index), 0) >= MAX
            assert letter.index not in self.dead, "dead-lettered twice"
            self.dead.add(letter.index)
        gone = self.source.delete([letter.index for letter in letters])
        self.d.removed(gone)
        for key in [k for k in self.held if k[1] in gone]:
            del self.held[key]
        self.pending_dead.clear()

    # -- rules --------------------------------------------------------------------------------
    @rule(n=st.integers(1, 3))
    def put(self, n: int) -> None:
        for _ in range(n):
            self.put_entries.add(self.source.put())

    @rule(group=st.sampled_from(GROUPS), user=st.sampled_from(USERS))
    def attach(self, group: str, user: str) -> None:
        cid = f"{group}.{user}"
        if cid in self.attached:
            return
        self.d.attach(ConsumerSpec(group=group, user=user, window=WINDOW, start=0))
        self.attached.add(cid)

    @rule(group=st.sampled_from(GROUPS), user=st.sampled_from(USERS))
    def detach(self, group: str, user: str, unwritten: list[int] | None = None) -> None:
        cid = f"{group}.{user}"
        if cid not in self.attached:
            return
        released = self.d.detach(cid, unwritten or ())
        self.attached.discard(cid)
        assert sorted(released) == sorted(i for (g, i), (c, _) in self.held.items() if c == cid)
        for index in released:
            del self.held[(group, index)]
            self._returned(group, index, None)
        self._settle()

    @rule(group=st.sampled_from(GROUPS), user=st.sampled_from(USERS), written=st.booleans())
    def poll(self, group: str, user: str, written: bool) -> None:
        """A poll, then its frames written (each counts a delivery), or the socket dying before
        they left (the consumer detaches; those frames count nothing)."""
        cid = f"{group}.{user}"
        got = self.d.poll(cid)
        if cid not in self.attached:
            assert got == []
            return
        for index in got:
            assert index not in self.dead
            assert (group, index) not in self.held, "held twice in one group"
            due = self.due.pop((group, index), None)
            assert due is None or due <= self.clock.now, "delivered while delayed"
            self.held[(group, index)] = (cid, self.clock.now)
        if got and not written:
            self.detach(group, user, got)
            return
        for index in got:
            self.counts[(group, index)] = self.counts.get((group, index), 0) + 1
            assert self.counts[(group, index)] <= MAX

    @rule(data=st.data())
    @precondition(lambda self: self.held)
    def commit(self, data) -> None:
        (group, index), (cid, _) = data.draw(st.sampled_from(sorted(self.held.items())))
        allowed = self.d.may_commit([index], group, cid)
        assert allowed == [index]
        gone = self.source.delete(allowed)
        self.d.commit(gone)
        self.committed.update(gone)
        for key in [k for k in self.held if k[1] in gone]:
            del self.held[key]

    @rule(data=st.data(), delay=st.one_of(st.none(), st.sampled_from([0.0, 0.5, 3.0])))
    @precondition(lambda self: self.held)
    def negative(self, data, delay) -> None:
        (group, index), _ = data.draw(st.sampled_from(sorted(self.held.items())))
        hit = self.d.negative([index], "500", "boom", group=group, delay=delay)
        assert hit == [index]
        del self.held[(group, index)]
        self._returned(group, index, delay)
        self._settle()

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0, 11.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds
        back = self.d.expire()
        expired = sorted((since, group, index) for (group, index), (_, since) in self.held.items()
                         if since + TIMEOUT <= self.clock.now)
        assert sorted(back) == sorted(index for _, _, index in expired), "lease hand-back differs from the model"
        for _, group, index in expired:
            del self.held[(group, index)]
            self._returned(group, index, None)
        self._settle()

    # -- invariants -----------------------------------------------------------------------------
    @invariant()
    def leases_hold(self) -> None:
        for (group, index), (cid, since) in self.held.items():
            assert since + TIMEOUT > self.clock.now, "a lease ran out and the entry is still held"
            assert index in self.d.pending_of(cid)

    @invariant()
    def windows_hold(self) -> None:
        per: dict[str, int] = {}
        for _, (cid, _) in self.held.items():
            per[cid] = per.get(cid, 0) + 1
        assert all(n <= WINDOW for n in per.values())

    @invariant()
    def counts_agree(self) -> None:
        for (group, index), n in self.counts.items():
            if index in self.source:
                assert self.d.deliveries_of(index, group) == n

    @invariant()
    def nothing_lost(self) -> None:
        live = {i for i in self.put_entries if i in self.source}
        assert live | self.committed | self.dead == self.put_entries
        assert not (self.committed & self.dead)


PolicyMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
test_policy_dispatch = PolicyMachine.TestCase
