"""The history a `qserve chaos` run records, and the checker that judges it (no I/O, no trio).

Strategy: the workload tasks all run in one trio thread, so a plain counter (``tick()``) orders every
observation exactly as the client saw it. Each call is recorded twice: when it starts and, only if
the server answered 200, when it was acknowledged; a call that never got its answer (the server was
killed, the task was cancelled) is *unknown*: it may or may not have taken effect, and the checker
gives it the benefit of the doubt both ways. At the end the checker compares what was acknowledged
with what was delivered, what was left in the queue and (with delivery policies) what is in the
dead-letter queue:

- **lost**: an acknowledged put that is not in the queue at the end, although no commit, delete or
  truncate (acknowledged or unknown) covers its index, and that is not in the dead-letter queue
  either (a copy with its id whose ``dlq.index`` is its index). Puts are at-least-once, so an unknown
  put that shows up is fine and one that does not is fine too.
- **resurrected**: an index whose commit, delete or truncate was acknowledged at tick T, and which is
  still in the queue at the end, or was delivered on a watch connection whose handshake *started*
  after T. A frame received after T on an older connection may have been sent before the server
  applied the commit (it was in flight), so it does not count. A *late* commit (below) is not an
  acknowledged removal here. Copies in the dead-letter queue are not judged for this: a move and a
  removal of one index race legitimately (another group's return can move an entry a consumer
  holds; a delete of a moved index deletes nothing), and the move's moment is not observable.
- **duplicates-index**: one id stored at two indexes (acknowledged, delivered, left or dead-lettered),
  two acknowledged ids at one index, an acknowledged index that later holds another id, an id
  dead-lettered twice or both dead-lettered and left in the queue, or a retried put answered as a
  new entry. Indexes cut off as a torn tail were never acknowledged and may be handed out again
  (storage/FORMAT.md): an unknown put seen at an index *before* an acknowledged put got that index
  is counted as ``reused`` instead, and so is an unknown attempt of a retried put seen at an index
  only before a kill that came before the attempt that was acknowledged (its first acknowledgment
  not a duplicate answer), never at the end.
- **out-of-order**: a producer's acknowledged indexes do not increase in acknowledgment order (the
  first acknowledgment of each put).
- **corrupted**: a delivered, left or dead-lettered payload or tag that is not what its put sent; a
  dead letter that is not a put of this run, names another queue, a ``dlq.index`` other than the
  index its put was acknowledged at, a ``dlq.requestId`` other than its put's requestId, or (with
  ``max_deliveries``) a ``dlq.deliveries`` other than that number.

Delivery policies (``--policies``; the `History` is told ``max_deliveries`` and
``delivery_timeout``, 0 when off):

- **Dead letters** are not lost (above). An entry may end there instead of being committed.
- **Idempotent puts**: a put with a requestId may be sent again with the same payload and tags (a
  retry, only with a dedup window): every acknowledged attempt must answer the same index, and an
  attempt after an acknowledged one must be a duplicate answer (``X-Qserve-Duplicate: 1``). A
  deduplicated put is one entry: its id at two indexes is duplicates-index as above.
- **poison**: a put tagged ``poison=1`` is negatively committed by every consumer, never committed.
  An acknowledged poison put must be in the dead-letter queue at the end, unless a delete or
  truncate (acknowledged or unknown) covers its index; it is counted once if it is not there (still
  in the queue, or gone) or if any acknowledged commit covers its index.
- **Late commits** (with ``delivery_timeout``): the server lets a commit delete only what the
  committing consumer holds or nobody in its group holds, so a commit whose consumer's hold may have
  ended before it was applied may have deleted nothing. A commit of index I by consumer C (group G),
  for C's last delivery D of I before the commit started, is late when: a kill that may have ended
  holds (of a server; of a Redis primary only when it was a fail-over or the primary was back after
  half a node lease or more: holds live in Redis) came after D's connection started and before the
  commit's acknowledgment; or C's watch connection at the commit's start is not D's; or another
  consumer's negative commit of I (acknowledged or not) was sent in that span (a negative commit
  releases the entry in every group that holds it, so another member of G may hold it now); or the
  workload measured at least ``delivery_timeout / 2`` from receiving D to the acknowledgment (the
  lease runs from the server's send, a little earlier); or a later delivery of I in G, or I's dead
  letter from G, carries ``lastCode=timeout``. Commits that do not name their consumer are never
  late.
- Counted, never a failure: dead letters, duplicate answers, delayed negative commits and deliveries
  carrying ``lastCode=timeout`` (an entry handed on after its lease ran out).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["History", "Report", "payload_for", "id_of", "POISON", "TIMEOUT_CODE"]

POISON = ("poison", "1")       # the tag of an entry every consumer refuses (negative commits only)
TIMEOUT_CODE = "timeout"       # lastCode of an entry whose consumer's lease ran out


def payload_for(put_id: str) -> bytes:
    """The payload a put with ``put_id`` sends: the id, ``|``, then 64..1963 bytes derived from it."""
    seed = hashlib.blake2b(put_id.encode(), digest_size=16).digest()
    n = 64 + int.from_bytes(seed[:2], "big") % 1900
    return put_id.encode() + b"|" + (seed * (n // 16 + 1))[:n]


def id_of(data: bytes) -> str:
    """The put id a payload starts with (whatever precedes the first ``|``)."""
    return data.split(b"|", 1)[0].decode("utf-8", "replace")


@dataclass
class Attempt:
    """One sending of a put: the first, or a retry with the same payload and tags."""

    start: int
    ack: int | None = None
    index: int | None = None
    duplicate: bool = False    # answered with X-Qserve-Duplicate: 1


@dataclass
class Put:
    id: str
    producer: int
    tags: dict[str, str]
    priority: int
    start: int
    ack: int | None = None     # the first acknowledgment (of any attempt), and its index
    index: int | None = None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def poison(self) -> bool:
        return self.tags.get(POISON[0]) == POISON[1]


@dataclass(frozen=True)
class Seen:
    """One observation of ``index`` holding ``id``: a watch delivery or an entry left at the end."""

    index: int
    id: str
    tick: int
    conn_start: int        # tick at which the delivering connection's handshake started; -1 = final drain
    group: str
    intact: bool
    consumer: str = ""
    last_code: str = ""


@dataclass(frozen=True)
class DeadSeen:
    """An entry found in the dead-letter queue at the end: ``origin`` is its ``dlq.index``."""

    dlq_index: int
    id: str
    tick: int
    origin: int | None
    group: str
    last_code: str
    intact: bool
    wrong: str             # "" or what its dlq.* tags get wrong


@dataclass
class Removal:
    kind: str              # "commit", "delete" or "truncate"
    indexes: tuple[int, ...] = ()
    below: int = 0         # truncate: every index < below
    start: int = 0
    ack: int | None = None
    by: str = ""           # commit: the consumer and its group ("": not known)
    group: str = ""
    conn_start: int = 0    # commit: the consumer's watch connection when the commit started
    held: float = 0.0      # commit: seconds from receiving the delivery to the acknowledgment

    def covers(self, index: int) -> bool:
        return index < self.below if self.kind == "truncate" else index in self.indexes


@dataclass
class Report:
    """What the checker found; ``problems`` holds one line of evidence per finding (capped)."""

    puts_acked: int = 0
    puts_unknown: int = 0
    unknown_found: int = 0
    deliveries: int = 0
    redeliveries: int = 0
    commits: int = 0
    negatives: int = 0
    deletes: int = 0
    truncates: int = 0
    remaining: int = 0
    lost: int = 0
    resurrected: int = 0
    duplicates_index: int = 0
    out_of_order: int = 0
    corrupted: int = 0
    reused: int = 0
    dead_lettered: int = 0
    duplicate_answers: int = 0
    delayed_negatives: int = 0
    lease_timeouts: int = 0
    poison_puts: int = 0
    poison: int = 0
    late_commits: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.resurrected or self.duplicates_index or self.out_of_order
                    or self.corrupted or self.poison)


_MAX_PROBLEMS = 50


class History:
    """The record of one run. Not task-safe across threads; fine for tasks of one trio run.

    Args:
        queue: the queue's name, as a dead letter's ``dlq.queue`` says it.
        max_deliveries, delivery_timeout: the servers' policies (0: off), for the checker.
    """

    def __init__(self, *, queue: str = "chaos", max_deliveries: int = 0, delivery_timeout: float = 0.0) -> None:
        self._tick = 0
        self.queue = queue
        self.max_deliveries = max_deliveries
        self.delivery_timeout = delivery_timeout
        self.puts: dict[str, Put] = {}
        self.seen: list[Seen] = []
        self.drained: list[Seen] = []
        self.dead: list[DeadSeen] = []
        self.removals: list[Removal] = []
        self.kills: list[int] = []
        self.hold_losses: list[int] = []   # the kills that ended consumers' holds
        self.nacks: dict[int, list[tuple[int, str]]] = {}   # index -> (tick, consumer) of negative commits
        self.negatives = 0
        self.delayed_negatives = 0
        self.anomalies: list[str] = []     # wrong answers seen by the workload (counted as corrupted)

    def tick(self) -> int:
        self._tick += 1
        return self._tick

    # -- recording -------------------------------------------------------------------------------
    def put_started(self, put_id: str, producer: int, tags: Mapping[str, str], priority: int) -> None:
        start = self.tick()
        self.puts[put_id] = Put(put_id, producer, dict(tags), priority, start, attempts=[Attempt(start)])

    def put_retried(self, put_id: str) -> None:
        """The put is sent again, with the same payload and tags (a retry)."""
        self.puts[put_id].attempts.append(Attempt(self.tick()))

    def put_acked(self, put_id: str, index: int, *, duplicate: bool = False) -> None:
        """The latest attempt of the put was answered 200 with ``index`` (``duplicate``: with
        ``X-Qserve-Duplicate: 1``)."""
        put = self.puts[put_id]
        attempt = put.attempts[-1]
        attempt.ack, attempt.index, attempt.duplicate = self.tick(), index, duplicate
        if put.ack is None:
            put.ack, put.index = attempt.ack, index

    def killed(self, *, holds_lost: bool = True) -> None:
        """A server (or the Redis primary) was just killed; ``holds_lost``: what consumers held
        may have gone back to their groups (a Redis primary keeps them, unless down for long)."""
        self.kills.append(self.tick())
        if holds_lost:
            self.hold_losses.append(self.kills[-1])

    def _observe(self, index: int, data: bytes, tags: Mapping[str, str], conn_start: int, group: str,
                 consumer: str = "") -> Seen:
        put_id = id_of(data)
        return Seen(index, put_id, self.tick(), conn_start, group, self._intact(put_id, data, tags), consumer,
                    tags.get("lastCode", ""))

    def _intact(self, put_id: str, data: bytes, tags: Mapping[str, str]) -> bool:
        put = self.puts.get(put_id)
        return (put is not None and data == payload_for(put_id)
                and all(tags.get(k) == v for k, v in put.tags.items()))

    def delivered(self, index: int, data: bytes, tags: Mapping[str, str], *, conn_start: int,
                  group: str, consumer: str = "") -> None:
        """A watch frame; ``conn_start`` is the tick taken just before its connection's handshake."""
        self.seen.append(self._observe(index, data, tags, conn_start, group, consumer))

    def remaining(self, index: int, data: bytes, tags: Mapping[str, str]) -> None:
        """An entry found in the queue by the final scan."""
        self.drained.append(self._observe(index, data, tags, -1, ""))

    def dead_letter(self, dlq_index: int, data: bytes, tags: Mapping[str, str]) -> None:
        """An entry found in the dead-letter queue by the final scan."""
        put_id = id_of(data)
        put = self.puts.get(put_id)
        origin = tags.get("dlq.index", "")
        wrong = []
        if tags.get("dlq.queue") != self.queue:
            wrong.append(f"dlq.queue {tags.get('dlq.queue')!r}")
        if not origin.isdigit():
            wrong.append(f"dlq.index {origin!r}")
        elif put is not None and put.index is not None and int(origin) != put.index:
            wrong.append(f"dlq.index {origin} (acknowledged at {put.index})")
        if put is not None and "requestId" in put.tags and tags.get("dlq.requestId") != put.tags["requestId"]:
            wrong.append(f"dlq.requestId {tags.get('dlq.requestId')!r}")
        if self.max_deliveries and tags.get("dlq.deliveries") != str(self.max_deliveries):
            wrong.append(f"dlq.deliveries {tags.get('dlq.deliveries')!r}")
        self.dead.append(DeadSeen(dlq_index, put_id, self.tick(), int(origin) if origin.isdigit() else None,
                                  tags.get("dlq.group", ""), tags.get("lastCode", ""),
                                  self._intact(put_id, data, tags), ", ".join(wrong)))

    def removal_started(self, kind: str, indexes: tuple[int, ...] = (), below: int = 0, *, by: str = "",
                        group: str = "", conn_start: int = 0) -> Removal:
        """A commit (``by`` a consumer of ``group`` whose watch connection started at ``conn_start``),
        delete or truncate is sent."""
        if kind not in ("commit", "delete", "truncate"):
            raise ValueError(f"unknown removal {kind!r}")
        op = Removal(kind, tuple(indexes), below, self.tick(), by=by, group=group, conn_start=conn_start)
        self.removals.append(op)
        return op

    def removal_acked(self, op: Removal, *, held: float = 0.0) -> None:
        """``held``: a commit's seconds from receiving its delivery to this acknowledgment."""
        op.ack, op.held = self.tick(), held

    def negative_started(self, index: int, *, by: str = "") -> None:
        """A negative commit of ``index`` by consumer ``by`` is sent."""
        self.nacks.setdefault(index, []).append((self.tick(), by))

    def negative_acked(self, *, delayed: bool = False) -> None:
        self.negatives += 1
        self.delayed_negatives += delayed

    def anomaly(self, text: str) -> None:
        """An answer that contradicts what was sent (a put echoing another request id, ...)."""
        self.anomalies.append(text)

    # -- checking --------------------------------------------------------------------------------
    def check(self) -> Report:
        rep = Report()

        def problem(text: str) -> None:
            if len(rep.problems) < _MAX_PROBLEMS:
                rep.problems.append(text)

        acked = {p.id: p for p in self.puts.values() if p.ack is not None}
        rep.puts_acked = len(acked)
        rep.puts_unknown = len(self.puts) - len(acked)
        rep.deliveries = len(self.seen)
        rep.remaining = len(self.drained)
        rep.negatives = self.negatives
        rep.delayed_negatives = self.delayed_negatives
        rep.dead_lettered = len(self.dead)
        rep.duplicate_answers = sum(a.duplicate for p in self.puts.values() for a in p.attempts)
        rep.lease_timeouts = sum(s.last_code == TIMEOUT_CODE for s in self.seen)
        rep.poison_puts = sum(p.poison for p in acked.values())
        done = [op for op in self.removals if op.ack is not None]
        rep.commits = sum(len(op.indexes) for op in done if op.kind == "commit")
        rep.deletes = sum(len(op.indexes) for op in done if op.kind == "delete")
        rep.truncates = sum(1 for op in done if op.kind == "truncate")
        observed = self.seen + self.drained

        first: set[tuple[str, int]] = set()
        for s in self.seen:
            key = (s.group, s.index)
            rep.redeliveries += key in first
            first.add(key)
        for s in observed:
            if not s.intact:
                rep.corrupted += 1
                problem(f"corrupted: index {s.index} carries id {s.id!r} with a payload or tags its put did not send")
        for d in self.dead:
            if not d.intact or d.wrong:
                rep.corrupted += 1
                what = d.wrong or "a payload or tags its put did not send"
                problem(f"corrupted: dead letter {d.dlq_index} carries id {d.id!r} with {what}")
        for text in self.anomalies:
            rep.corrupted += 1
            problem(f"corrupted: {text}")
        found = {s.id for s in observed} | {d.id for d in self.dead}
        rep.unknown_found = sum(1 for p in self.puts.values() if p.ack is None and p.id in found)

        self._check_indexes(acked, observed, rep, problem)
        self._check_dead_letters(acked, rep, problem)
        self._check_removals(acked, rep, problem)
        return rep

    def _check_indexes(self, acked: dict[str, Put], observed: list[Seen], rep: Report, problem) -> None:
        by_id: dict[str, set[int]] = {}
        by_index: dict[int, list[tuple[int, str]]] = {}
        for p in acked.values():
            by_id.setdefault(p.id, set()).update(a.index for a in p.attempts if a.ack is not None)
            by_index.setdefault(p.index, []).append((p.ack, p.id))
        for s in observed:
            if s.id in self.puts:
                by_id.setdefault(s.id, set()).add(s.index)
            by_index.setdefault(s.index, []).append((s.tick, s.id))
        for d in self.dead:
            if d.id in self.puts and d.origin is not None:
                by_id.setdefault(d.id, set()).add(d.origin)
        for put_id, indexes in sorted(by_id.items()):
            if len(indexes) > 1:
                cut = self._cut_attempts(self.puts[put_id], indexes)
                if cut:
                    rep.reused += len(cut)
                    indexes = indexes - cut
            if len(indexes) > 1:
                rep.duplicates_index += 1
                problem(f"duplicates-index: id {put_id} seen at indexes {sorted(indexes)}")
        for p in sorted(self.puts.values(), key=lambda p: p.start):
            answers = [a for a in p.attempts if a.ack is not None]
            fresh = [a for a in answers[1:] if not a.duplicate]
            if fresh:
                rep.duplicates_index += 1
                problem(f"duplicates-index: put {p.id} retried after its acknowledgment at index {answers[0].index} "
                        f"was answered as a new entry at index {fresh[0].index}")
        for index, obs in sorted(by_index.items()):
            ids = {i for _, i in obs}
            if len(ids) < 2:
                continue
            owners = sorted(i for i in ids if i in acked)
            if len(owners) > 1:
                rep.duplicates_index += 1
                problem(f"duplicates-index: index {index} acknowledged for ids {owners}")
            elif owners:
                owner = acked[owners[0]]
                late = [i for t, i in obs if i != owner.id and t > owner.start]
                if late:
                    rep.duplicates_index += 1
                    problem(f"duplicates-index: index {index} acknowledged for {owner.id} later held {late[0]}")
                else:
                    rep.reused += 1
        by_producer: dict[int, list[Put]] = {}
        for p in acked.values():
            by_producer.setdefault(p.producer, []).append(p)
        for producer, puts in sorted(by_producer.items()):
            puts.sort(key=lambda p: p.ack)
            for a, b in zip(puts, puts[1:]):
                if b.index <= a.index:
                    rep.out_of_order += 1
                    problem(f"out-of-order: producer {producer} got index {b.index} ({b.id}) after "
                            f"{a.index} ({a.id})")

    def _cut_attempts(self, put: Put, indexes: set[int]) -> set[int]:
        """Of a retried put's ``indexes``, those an unknown attempt got and a torn tail cut: seen
        only in deliveries before a kill that came before the attempt acknowledged first (a fresh
        answer, not a duplicate); empty if that does not hold for all but the acknowledged one."""
        first = next((a for a in put.attempts if a.ack is not None), None)
        if first is None or first.duplicate or len(put.attempts) < 2:
            return set()
        kills = [k for k in self.kills if k < first.start]
        cut = set()
        for index in indexes - {first.index}:
            ticks = [s.tick for s in self.seen if s.id == put.id and s.index == index]
            at_end = any(s.id == put.id and s.index == index for s in self.drained) or \
                any(d.id == put.id and d.origin == index for d in self.dead)
            if at_end or not ticks or not kills or max(ticks) > kills[-1]:
                return set()
            cut.add(index)
        return cut

    def _check_dead_letters(self, acked: dict[str, Put], rep: Report, problem) -> None:
        copies: dict[str, list[DeadSeen]] = {}
        for d in self.dead:
            copies.setdefault(d.id, []).append(d)
        left = {s.id for s in self.drained}
        for put_id, dl in sorted(copies.items()):
            if len(dl) > 1:
                rep.duplicates_index += 1
                problem(f"duplicates-index: id {put_id} dead-lettered {len(dl)} times "
                        f"(dead letters {sorted(d.dlq_index for d in dl)})")
            elif put_id in left:
                rep.duplicates_index += 1
                problem(f"duplicates-index: id {put_id} is both dead-lettered (dead letter {dl[0].dlq_index}) "
                        f"and left in the queue")
        erased = self._deleted_or_truncated
        committed = {i for op in self.removals if op.kind == "commit" and op.ack is not None for i in op.indexes}
        for p in sorted(acked.values(), key=lambda p: p.ack):
            if not p.poison:
                continue
            dead = any(d.origin == p.index for d in copies.get(p.id, ()))
            if p.index in committed:
                why = "was committed"
            elif dead or erased(p.index):
                continue
            else:
                why = ("is still in the queue" if p.id in left else "is gone") + ", not in the dead-letter queue"
            rep.poison += 1
            problem(f"poison: {p.id} acknowledged at index {p.index} (tick {p.ack}) {why}")

    def _deleted_or_truncated(self, index: int) -> bool:
        """Whether a delete or truncate, acknowledged or unknown, covers ``index``."""
        return any(op.covers(index) for op in self.removals if op.kind != "commit")

    def _late(self, op: Removal, index: int, seen: dict[int, list[Seen]]) -> bool:
        """Whether commit ``op`` of ``index`` is late (module docstring): it may have deleted nothing.
        ``seen``: the deliveries by index, in tick order."""
        if not (self.delivery_timeout and op.kind == "commit" and op.by):
            return False
        here = seen.get(index, [])
        mine = [s for s in here if s.consumer == op.by and s.group == op.group and s.tick < op.start]
        if not mine:
            return True
        d = mine[-1]
        return (any(d.conn_start < k < op.ack for k in self.hold_losses) or op.conn_start != d.conn_start
                or any(d.conn_start < t < op.ack and by != op.by for t, by in self.nacks.get(index, ()))
                or op.held >= self.delivery_timeout / 2
                or any(s.group == op.group and s.tick > d.tick and s.last_code == TIMEOUT_CODE for s in here)
                or any(x.origin == index and x.group == op.group and x.last_code == TIMEOUT_CODE for x in self.dead))

    def _check_removals(self, acked: dict[str, Put], rep: Report, problem) -> None:
        # earliest acknowledged removal of each index (late commits left out); truncates apply to
        # every index below them
        removed_at: dict[int, tuple[int, Removal]] = {}
        truncs = sorted((op for op in self.removals if op.kind == "truncate" and op.ack is not None),
                        key=lambda op: op.ack)
        seen: dict[int, list[Seen]] = {}
        for s in self.seen:
            seen.setdefault(s.index, []).append(s)
        for op in self.removals:
            if op.kind != "truncate" and op.ack is not None:
                for i in op.indexes:
                    if self._late(op, i, seen):
                        rep.late_commits += 1
                    elif i not in removed_at or op.ack < removed_at[i][0]:
                        removed_at[i] = (op.ack, op)

        def acked_removal(index: int) -> tuple[int, Removal] | None:
            best = removed_at.get(index)
            for op in truncs:
                if index < op.below:
                    if best is None or op.ack < best[0]:
                        best = (op.ack, op)
                    break
            return best

        resurrected: set[int] = set()
        for s in self.seen + self.drained:
            hit = acked_removal(s.index)
            if hit is None or s.index in resurrected:
                continue
            tick, op = hit
            what = f"{op.kind} {'below ' + str(op.below) if op.kind == 'truncate' else s.index}"
            if s.conn_start == -1:
                resurrected.add(s.index)
                problem(f"resurrected: index {s.index} ({s.id}) still in the queue at the end after an "
                        f"acknowledged {what} (tick {tick})")
            elif s.conn_start > tick:
                resurrected.add(s.index)
                problem(f"resurrected: index {s.index} ({s.id}) delivered to group {s.group} at tick {s.tick} "
                        f"on a connection opened at tick {s.conn_start}, after an acknowledged {what} "
                        f"(tick {tick})")
        rep.resurrected = len(resurrected)

        left = {(s.index, s.id) for s in self.drained} | {(d.origin, d.id) for d in self.dead}
        any_removal: set[int] = set()
        trunc_any = max((op.below for op in self.removals if op.kind == "truncate"), default=0)
        for op in self.removals:
            if op.kind != "truncate":
                any_removal.update(op.indexes)
        delivered = {s.id for s in self.seen}
        for p in sorted(acked.values(), key=lambda p: p.ack):
            if (p.index, p.id) in left or p.index in any_removal or p.index < trunc_any:
                continue
            rep.lost += 1
            problem(f"lost: {p.id} acknowledged at index {p.index} (tick {p.ack}) is gone although nothing "
                    f"removed or dead-lettered it ({'delivered before' if p.id in delivered else 'never delivered'})")
