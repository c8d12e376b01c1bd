"""The history a `qserve chaos` run records (no I/O, no trio); `checker` judges it.

Strategy: the workload tasks all run in one trio thread, so a plain counter (``tick()``) orders every
observation exactly as the client saw it. Each call is recorded twice: when it starts and, only if
the server answered 200, when it was acknowledged; a call that never got its answer (the server was
killed, the task was cancelled) is *unknown*: it may or may not have taken effect, and the checker
gives it the benefit of the doubt both ways. At the end the checker (`checker.HistoryChecks`,
`History.check`) compares what was acknowledged with what was delivered, what was left in the queue
and (with delivery policies) what is in the dead-letter queue; its rules are in checker.py.
"""

from __future__ import annotations

from typing import Mapping

from .checker import HistoryChecks
from .records import TIMEOUT_CODE, Attempt, DeadSeen, Put, Removal, Seen, id_of, payload_for

__all__ = ["History"]


class History(HistoryChecks):
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
        self.timed_out = 0   # deliveries that came back after a lease ran out (lastCode=timeout)
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
        if tags.get("lastCode") == TIMEOUT_CODE:
            self.timed_out += 1

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
