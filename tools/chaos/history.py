"""The history a `qserve chaos` run records, and the checker that judges it (no I/O, no trio).

Strategy: the workload tasks all run in one trio thread, so a plain counter (``tick()``) orders every
observation exactly as the client saw it. Each call is recorded twice: when it starts and, only if
the server answered 200, when it was acknowledged; a call that never got its answer (the server was
killed, the task was cancelled) is *unknown*: it may or may not have taken effect, and the checker
gives it the benefit of the doubt both ways. At the end the checker compares what was acknowledged
with what was delivered and what was left in the queue:

- **lost**: an acknowledged put that is not in the queue at the end, although no commit, delete or
  truncate (acknowledged or unknown) covers its index. Puts are at-least-once, so an unknown put that
  shows up is fine and one that does not is fine too.
- **resurrected**: an index whose commit, delete or truncate was acknowledged at tick T, and which is
  still in the queue at the end, or was delivered on a watch connection whose handshake *started*
  after T. A frame received after T on an older connection may have been sent before the server
  applied the commit (it was in flight), so it does not count.
- **duplicates-index**: one id stored at two indexes (puts are sent once, never retried), two
  acknowledged ids at one index, or an acknowledged index that later holds another id. Indexes cut off
  as a torn tail were never acknowledged and may be handed out again (storage/FORMAT.md): an unknown
  put seen at an index *before* an acknowledged put got that index is counted as ``reused`` instead.
- **out-of-order**: a producer's acknowledged indexes do not increase in acknowledgment order.
- **corrupted**: a delivered payload or tag that is not what its put sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping

__all__ = ["History", "Report", "payload_for", "id_of"]


def payload_for(put_id: str) -> bytes:
    """The payload a put with ``put_id`` sends: the id, ``|``, then 64..1963 bytes derived from it."""
    seed = hashlib.blake2b(put_id.encode(), digest_size=16).digest()
    n = 64 + int.from_bytes(seed[:2], "big") % 1900
    return put_id.encode() + b"|" + (seed * (n // 16 + 1))[:n]


def id_of(data: bytes) -> str:
    """The put id a payload starts with (whatever precedes the first ``|``)."""
    return data.split(b"|", 1)[0].decode("utf-8", "replace")


@dataclass
class Put:
    id: str
    producer: int
    tags: dict[str, str]
    priority: int
    start: int
    ack: int | None = None
    index: int | None = None


@dataclass(frozen=True)
class Seen:
    """One observation of ``index`` holding ``id``: a watch delivery or an entry left at the end."""

    index: int
    id: str
    tick: int
    conn_start: int        # tick at which the delivering connection's handshake started; -1 = final drain
    group: str
    intact: bool


@dataclass
class Removal:
    kind: str              # "commit", "delete" or "truncate"
    indexes: tuple[int, ...] = ()
    below: int = 0         # truncate: every index < below
    start: int = 0
    ack: int | None = None

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
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.resurrected or self.duplicates_index or self.out_of_order
                    or self.corrupted)


_MAX_PROBLEMS = 50


class History:
    """The record of one run. Not task-safe across threads; fine for tasks of one trio run."""

    def __init__(self) -> None:
        self._tick = 0
        self.puts: dict[str, Put] = {}
        self.seen: list[Seen] = []
        self.drained: list[Seen] = []
        self.removals: list[Removal] = []
        self.negatives = 0
        self.anomalies: list[str] = []     # wrong answers seen by the workload (counted as corrupted)

    def tick(self) -> int:
        self._tick += 1
        return self._tick

    # -- recording -------------------------------------------------------------------------------
    def put_started(self, put_id: str, producer: int, tags: Mapping[str, str], priority: int) -> None:
        self.puts[put_id] = Put(put_id, producer, dict(tags), priority, self.tick())

    def put_acked(self, put_id: str, index: int) -> None:
        put = self.puts[put_id]
        put.ack, put.index = self.tick(), index

    def _observe(self, index: int, data: bytes, tags: Mapping[str, str], conn_start: int, group: str) -> Seen:
        put_id = id_of(data)
        put = self.puts.get(put_id)
        intact = (put is not None and data == payload_for(put_id)
                  and all(tags.get(k) == v for k, v in put.tags.items()))
        return Seen(index, put_id, self.tick(), conn_start, group, intact)

    def delivered(self, index: int, data: bytes, tags: Mapping[str, str], *, conn_start: int,
                  group: str) -> None:
        """A watch frame; ``conn_start`` is the tick taken just before its connection's handshake."""
        self.seen.append(self._observe(index, data, tags, conn_start, group))

    def remaining(self, index: int, data: bytes, tags: Mapping[str, str]) -> None:
        """An entry found in the queue by the final scan."""
        self.drained.append(self._observe(index, data, tags, -1, ""))

    def removal_started(self, kind: str, indexes: tuple[int, ...] = (), below: int = 0) -> Removal:
        if kind not in ("commit", "delete", "truncate"):
            raise ValueError(f"unknown removal {kind!r}")
        op = Removal(kind, tuple(indexes), below, self.tick())
        self.removals.append(op)
        return op

    def removal_acked(self, op: Removal) -> None:
        op.ack = self.tick()

    def negative_acked(self) -> None:
        self.negatives += 1

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
        for text in self.anomalies:
            rep.corrupted += 1
            problem(f"corrupted: {text}")
        found = {s.id for s in observed}
        rep.unknown_found = sum(1 for p in self.puts.values() if p.ack is None and p.id in found)

        self._check_indexes(acked, observed, rep, problem)
        self._check_removals(acked, rep, problem)
        return rep

    def _check_indexes(self, acked: dict[str, Put], observed: list[Seen], rep: Report, problem) -> None:
        by_id: dict[str, set[int]] = {}
        by_index: dict[int, list[tuple[int, str]]] = {}
        for p in acked.values():
            by_id.setdefault(p.id, set()).add(p.index)
            by_index.setdefault(p.index, []).append((p.ack, p.id))
        for s in observed:
            if s.id in self.puts:
                by_id.setdefault(s.id, set()).add(s.index)
            by_index.setdefault(s.index, []).append((s.tick, s.id))
        for put_id, indexes in sorted(by_id.items()):
            if len(indexes) > 1:
                rep.duplicates_index += 1
                problem(f"duplicates-index: id {put_id} seen at indexes {sorted(indexes)}")
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

    def _check_removals(self, acked: dict[str, Put], rep: Report, problem) -> None:
        # earliest acknowledged removal of each index; truncates apply to every index below them
        removed_at: dict[int, tuple[int, Removal]] = {}
        truncs = sorted((op for op in self.removals if op.kind == "truncate" and op.ack is not None),
                        key=lambda op: op.ack)
        for op in self.removals:
            if op.kind != "truncate" and op.ack is not None:
                for i in op.indexes:
                    if i not in removed_at or op.ack < removed_at[i][0]:
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

        left = {(s.index, s.id) for s in self.drained}
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
                    f"removed it ({'delivered before' if p.id in delivered else 'never delivered'})")
