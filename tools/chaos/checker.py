"""The checker of a `qserve chaos` run: `HistoryChecks.check` judges the `history.History` it is a
mixin of, into a `Report`.

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

from dataclasses import dataclass, field

from .records import TIMEOUT_CODE, DeadSeen, Put, Removal, Seen

__all__ = ["HistoryChecks", "Report"]


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


class HistoryChecks:
    """The checks of `history.History` (which provides the attributes annotated here)."""

    puts: dict[str, Put]
    seen: list[Seen]
    drained: list[Seen]
    dead: list[DeadSeen]
    removals: list[Removal]
    kills: list[int]
    hold_losses: list[int]
    nacks: dict[int, list[tuple[int, str]]]
    negatives: int
    delayed_negatives: int
    timed_out: int
    anomalies: list[str]
    delivery_timeout: float

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
        rep.lease_timeouts = self.timed_out
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
