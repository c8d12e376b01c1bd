"""What the server counts while it serves: per-queue counters, requests, latency histograms.

Strategy: the hot path pays one attribute increment (a put: ``meters.of(ref).puts += 1``, plus one
histogram observation for its latency) on plain Python numbers owned by one `Meters` per server;
nothing here takes a lock or formats anything, since the server runs on one trio thread.
`server.metrics` reads these numbers at scrape time and hands them to prometheus-client as metric
families. Counting happens in the server's app and watch layers, above the backend seam, so it is
the same for every backend; the figures are this server's own (with several nodes on one Redis,
each node counts what passed through it, and Prometheus adds them up).

Redeliveries: an entry is redelivered when a group hands it out again (after a negative commit,
a consumer that went away, a replaced consumer id, a lapsed lease). Indexes are never reused, so
"this group already delivered this index" is exactly that. Each queue remembers, per group, the
indexes this server delivered to manual-commit consumers and has not seen committed or deleted
(commits and deletes through this server forget them); the memory is bounded by `SEEN_CAP`
indexes per group (the oldest are forgotten first: only an entry held while that many others
were delivered after it could then be counted as a first delivery).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from qserve.backends.base import StoredEntry
from qserve.core.events import QueueRef

__all__ = ["Meters", "QueueMeters", "Histogram", "COUNTERS", "SEEN_CAP", "queue_kind"]

#: per-queue counters: attribute name -> help text (exposed as ``qserve_<name>_total``)
COUNTERS = {
    "puts": "entries put",
    "gets": "entries returned by gets",
    "deliveries": "entries delivered to watchers (frames written), redeliveries included",
    "redeliveries": "entries a group delivered again (after a negative commit, a consumer gone or replaced, "
                    "a lapsed lease)",
    "commits": "indexes committed (in commits answered 200)",
    "negatives": "indexes negatively committed (in negative commits answered 200)",
    "deletes": "indexes deleted (in deletes answered 200)",
    "truncates": "truncations answered 200",
    "deduplicated": "puts answered with the index of an earlier put of their requestId (dedup_window)",
    "replayed": "dead letters replayed into their queue (counted on the dead-letter queue)",
}
SEEN_CAP = 16384   # indexes remembered per group for telling a redelivery (module docstring)

# seconds; a put waits for its fsync round (or Redis's answer), a get may long-poll, an entry may
# wait in its queue for long; few buckets each: every one is a sample in every scrape
PUT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
GET_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
LAG_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0)


def queue_kind(ref: QueueRef) -> str:
    """The ``queue`` label of a queue: ``input``, ``sink`` or ``dlq``."""
    return ref.kind


class Histogram:
    """Observations counted into fixed buckets (upper bounds, seconds) and summed."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)   # the last one: above every bound
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, observations <= le)`` for each bound and ``+Inf``, as Prometheus buckets are."""
        out, running = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out


class QueueMeters:
    """The counters of one queue (`COUNTERS`) and the indexes its groups delivered."""

    __slots__ = (*COUNTERS, "_seen")

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self._seen: dict[str, dict[int, None]] = {}   # group -> indexes delivered, oldest first

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    def settled(self, indexes: Iterable[int]) -> None:
        """These entries are gone (committed, deleted): no group can deliver them again."""
        if self._seen:
            indexes = list(indexes)
            for seen in self._seen.values():
                for index in indexes:
                    seen.pop(index, None)

    def truncated(self, below: int) -> None:
        """Every entry below ``below`` is gone."""
        for group, seen in self._seen.items():
            self._seen[group] = {index: None for index in seen if index >= below}


class Meters:
    """Everything one server counts. Trio thread only (no locks: nothing here awaits).

    Args:
        wall_clock: unix seconds, to compare with the ``ts@source`` / ``ts@sink`` tag (ms) a put
            stamped (the server's own clock, so a test can fix it).
    """

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self.queues: dict[QueueRef, QueueMeters] = {}
        self.requests: Counter[tuple[str, int]] = Counter()   # (operation, status) -> answered
        self.put_seconds = Histogram(PUT_BUCKETS)
        self.get_seconds = Histogram(GET_BUCKETS)
        self.first_delivery_seconds = Histogram(LAG_BUCKETS)
        self.recovery_seconds: float | None = None   # set once the start-up opened every queue
        self.recovered_entries: int | None = None

    def of(self, ref: QueueRef) -> QueueMeters:
        """The counters of queue ``ref`` (created at its first count)."""
        meters = self.queues.get(ref)
        if meters is None:
            meters = self.queues[ref] = QueueMeters()
        return meters

    def started(self, seconds: float, entries: int | None) -> None:
        """The start-up opened every queue in ``seconds``, holding ``entries`` (None: unknown)."""
        self.recovery_seconds, self.recovered_entries = seconds, entries

    def request(self, operation: str, status: int) -> None:
        """One request answered (a WebSocket watch: 101 once its handshake is accepted)."""
        self.requests[operation, status] += 1

    def delivered(self, ref: QueueRef, group: str, entries: Sequence[StoredEntry], *, held: bool) -> None:
        """The frames of ``entries`` were written to a consumer of ``group`` (``held``: it commits
        them itself, so they may come back). Counts deliveries and redeliveries, and observes the
        time from each first delivery's put (its ``ts@`` tag) to now."""
        meters = self.of(ref)
        seen = meters._seen.get(group)
        if seen is None:
            seen = meters._seen[group] = {}
        stamp_tag = "ts@sink" if ref.sink else "ts@source"
        now_ms = self._wall_clock() * 1000.0
        observe = self.first_delivery_seconds.observe
        again = 0
        for entry in entries:
            index = entry.index
            if index in seen:
                again += 1
                if not held:
                    del seen[index]   # an auto-commit delivery deletes it
                continue
            if held:
                seen[index] = None
            stamp = entry.tags.get(stamp_tag)
            if stamp is not None and stamp.isdigit():
                observe(max(0.0, (now_ms - int(stamp)) / 1000.0))
        meters.deliveries += len(entries)
        meters.redeliveries += again
        while len(seen) > SEEN_CAP:
            del seen[next(iter(seen))]
