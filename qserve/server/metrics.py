"""`GET /metrics`: the server's figures in Prometheus's format (prometheus-client), or as JSON.

Strategy: each server owns a `CollectorRegistry` (no global registry, no module-level state) with
two collectors: prometheus-client's own for the process (CPU, RSS, open fds), and
`_QueueServerCollector`, which builds metric families from live state when it is collected: the counters and histograms the app and watch layers keep (`server.meters`), the HTTP
edge's and the watch service's statistics, and each queue's figures. A queue's figures come
through the backend seam and may need the network (Redis), while a collector is synchronous, so
`Metrics.refresh` reads them (`Backend.listing`, each open queue's attributes, `Backend.statistics`
for the local backend's bytes and segments) right before the registry is collected; one scrape
reads them once. `snapshot()` is the same figures as one JSON document, for the dashboard.

Costs: nothing is computed between scrapes but what `server.meters` counts; a scrape costs one
listing, one attributes call per open queue, the /proc reads of the process collector, and
prometheus-client's encoding, about 10 us per sample on the CI VM (a server of 5 services: ~150
samples). The families are collected at once (one consistent reading) and then encoded
`ENCODE_CHUNK` families at a time, with a checkpoint in between, so that a scrape never holds the
event loop for more than a fraction of a millisecond: puts and fsync completions go on meanwhile.
A rendering is reused for the scrapes (of the same format) that come within `RENDER_EVERY`
seconds of it, so that scrapers in a loop (or many of them) cost at most a few renderings a
second whatever their pace; a scraper every second or slower always gets a fresh one.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from qserve.backends.base import Backend, QueueStatus
from qserve.core.errors import QServeError
from qserve.core.events import QueueRef
from qserve.server.meters import COUNTERS, Histogram, Meters, queue_kind
from qserve.wire.durations import DurationError, parse_go_duration

__all__ = ["Metrics", "QueueFigures", "parse_groups", "ENCODE_CHUNK", "RENDER_EVERY"]

QUEUE_LABELS = ["service", "queue"]
POLICY_FIGURES = ("delayed", "dead_lettered", "timed_out")   # delivery policies: a backend's statistics() per queue
COMMIT_FIGURES = {   # the local backend's group commit, per queue: its statistics() -> the family's help
    "fsync_round_seconds": "seconds from each group-commit fsync round's start to its end (local backend, "
                           "--fsync always or interval): every durable answer waits for one",
    "fsync_writes": "records the group-commit rounds made durable: divided by the rounds, the writes each fsync "
                    "carried",
}
ENCODE_CHUNK = 8            # metric families encoded between two checkpoints
RENDER_EVERY = 0.25         # seconds (trio clock) a rendering answers the scrapes that follow it
_OPENMETRICS_END = b"# EOF\n"

# the ``consumers.list.[i]`` / ``groups.list.[i]`` attribute values (`core.group_report.render_rows`,
# PROTOCOL.md section 7); an id may hold ", ", so it is matched up to the fixed tail
_CONSUMER = re.compile(r"Id: (?P<id>.*), Index: (?P<index>\d+), Pending: (?P<pending>\d+), Status: (?P<status>\w+), "
                       r"Idle: (?P<idle>\S+), Window: (?P<window>\d+), Slots: (?P<slots>-?\d+), "
                       r"AutoCommit: (?P<auto_commit>true|false)")
_GROUP = re.compile(r"Id: (?P<id>.*), Index: (?P<index>\d+), Pending: (?P<pending>\d+), "
                    r"Delivered: (?P<delivered>\d+), Consumers: (?P<consumers>\d+)")


@dataclass
class QueueFigures:
    """One queue's figures at one scrape."""

    ref: QueueRef
    status: QueueStatus
    groups: list[dict] = field(default_factory=list)      # each group's figures (`parse_groups`)
    consumers: list[dict] = field(default_factory=list)   # each consumer's figures
    disk: dict = field(default_factory=dict)              # local backend: bytes, segments
    policy: dict = field(default_factory=dict)            # delivery policies: delayed, dead_lettered, timed_out
    commit: dict = field(default_factory=dict)            # local backend: `COMMIT_FIGURES`
    listed: bool = True     # False: only counted (not in the listing: Redis was down)

    @property
    def pending(self) -> int:
        return sum(group["pending"] for group in self.groups)

    @property
    def labels(self) -> list[str]:
        return [self.ref.service, queue_kind(self.ref)]


def parse_groups(attrs: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """The groups and consumers a queue's attributes list, as numbers: ``([{name, index, pending,
    delivered, consumers}], [{id, group, index, pending, status, idle, window, slots, auto_commit}])``;
    an entry in another layout is left out."""
    groups, consumers = [], []
    for key, value in attrs.items():
        if key.startswith("groups.list.") and (m := _GROUP.fullmatch(value)):
            groups.append({"name": m["id"], "index": int(m["index"]), "pending": int(m["pending"]),
                           "delivered": int(m["delivered"]), "consumers": int(m["consumers"])})
        elif key.startswith("consumers.list.") and (m := _CONSUMER.fullmatch(value)):
            try:
                idle = parse_go_duration(m["idle"]) / 1e9
            except DurationError:
                idle = None
            consumers.append({"id": m["id"], "group": m["id"].partition(".")[0], "index": int(m["index"]),
                              "pending": int(m["pending"]), "status": m["status"], "idle": idle,
                              "window": int(m["window"]), "slots": int(m["slots"]),
                              "auto_commit": m["auto_commit"] == "true"})
    return groups, consumers


class Metrics:
    """The figures of one server: `exposition()` for Prometheus, `snapshot()` for the dashboard.
    Trio thread only.

    Args:
        meters: what the app and watch layers count.
        queues: the backend.
        edge: the HTTP edge's `statistics()` (connections, WebSockets).
        watch: the watch service's `statistics()` (sessions).
        readiness: why the server is not ready (None: it is); see `server.health`.
    """

    def __init__(self, meters: Meters, queues: Backend, *, edge: Callable[[], dict], watch: Callable[[], dict],
                 readiness: Callable[[], Awaitable[str | None]]) -> None:
        self.meters = meters
        self._queues = queues
        self._edge = edge
        self._watch = watch
        self._readiness = readiness
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.registry.register(_QueueServerCollector(self))
        self.figures: list[QueueFigures] = []   # the last `refresh`
        self.not_ready: str | None = None
        self.storage_problem: str | None = None   # the listing failed (Redis down): no queue figures
        self._rendered: dict[str, tuple[float, bytes]] = {}   # content type -> (when, body)

    async def refresh(self) -> None:
        """Read every queue's figures and the readiness (before the registry is collected)."""
        self.not_ready = await self._readiness()
        try:
            statuses = await self._queues.listing()
        except QServeError as exc:
            self.figures, self.storage_problem = [], exc.reason
            return
        self.storage_problem = None
        disk = self._queues.statistics()   # local: per queue name, its log's figures
        figures = []
        for status in statuses:
            found = QueueFigures(status.ref, status)
            stats = disk.get(status.ref.name, {})
            found.disk = {key: stats[key] for key in ("bytes", "segments") if key in stats}
            found.policy = {key: stats[key] for key in POLICY_FIGURES if key in stats}
            found.commit = {key: stats[key] for key in COMMIT_FIGURES if key in stats}
            if status.fenced is None:
                try:
                    attrs = await (await self._queues.get(status.ref)).attributes()
                except QServeError:
                    pass   # fenced or gone since the listing: its counts stay out
                else:
                    found.groups, found.consumers = parse_groups(attrs)
                    if "delayed" not in found.policy and "policy.delayed" in attrs:   # Redis: kept there
                        found.policy["delayed"] = int(attrs["policy.delayed"])
            figures.append(found)
        self.figures = figures

    async def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The figures in the format ``accept`` asks for (Prometheus text by default, OpenMetrics
        if asked): the body and its Content-Type; the last one if it is younger than `RENDER_EVERY`."""
        encoder, content_type = choose_encoder(accept)
        last = self._rendered.get(content_type)
        if last is not None and trio.current_time() - last[0] < RENDER_EVERY:
            return last[1], content_type
        when = trio.current_time()
        await self.refresh()
        families = list(self.registry.collect())
        parts = []
        for start in range(0, len(families), ENCODE_CHUNK):
            part = encoder(_Families(families[start:start + ENCODE_CHUNK]))
            if part.endswith(_OPENMETRICS_END):   # OpenMetrics ends the whole exposition once
                part = part[:-len(_OPENMETRICS_END)]
            parts.append(part)
            await trio.lowlevel.checkpoint()
        if content_type.startswith("application/openmetrics-text"):
            parts.append(_OPENMETRICS_END)
        body = b"".join(parts)
        self._rendered[content_type] = (when, body)
        return body, content_type

    async def snapshot(self) -> dict:
        """The same figures as one JSON-ready document."""
        await self.refresh()
        meters, edge, watch = self.meters, self._edge(), self._watch()
        queues = []
        for found in self._every_queue():
            status = found.status
            counted = meters.queues.get(found.ref)
            queues.append({
                "service": found.ref.service, "queue": queue_kind(found.ref), "fenced": status.fenced,
                "length": status.length, "first_index": status.first_index, "last_index": status.last_index,
                "consumers": status.consumers, "pending": found.pending, **found.disk,
                "counters": counted.counts() if counted else dict.fromkeys(COUNTERS, 0),
                "groups": found.groups, "consumer_list": found.consumers,
            })
        return {
            "ready": self.not_ready is None, "not_ready": self.not_ready, "storage_problem": self.storage_problem,
            "server": {
                "connections": edge.get("connections_open", 0), "websockets": edge.get("websockets_open", 0),
                "watch_sessions": watch.get("sessions", 0),
                "requests": [{"operation": op, "status": status, "count": n}
                             for (op, status), n in sorted(meters.requests.items())],
                "recovery_seconds": meters.recovery_seconds, "recovered_entries": meters.recovered_entries,
            },
            "latency": {name: {"count": h.count, "sum": h.total, "buckets": h.cumulative()}
                        for name, h in self._histograms().items()},
            "queues": queues,
        }

    def _every_queue(self) -> list[QueueFigures]:
        """The queues of the last refresh, and any other this server counted (Redis down: its
        counters are still shown)."""
        listed = {found.ref for found in self.figures}
        extra = [QueueFigures(ref, QueueStatus(ref), listed=False) for ref in self.meters.queues if ref not in listed]
        return [*self.figures, *sorted(extra, key=lambda f: f.ref.order)]

    def _histograms(self) -> dict[str, Histogram]:
        return {"put": self.meters.put_seconds, "get": self.meters.get_seconds,
                "first_delivery": self.meters.first_delivery_seconds}


class _Families:
    """Already collected metric families, as the collector an encoder asks for."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self):
        return iter(self._families)


class _QueueServerCollector:
    """Builds qserve's own metric families from `Metrics`' last refresh and the live counters."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self):
        metrics = self._metrics
        yield from self._queues(metrics)
        yield from self._server(metrics)

    @staticmethod
    def _queues(metrics: Metrics):
        gauges = {
            "length": "live entries", "first_index": "index of the oldest live entry (0: none)",
            "last_index": "index of the newest live entry (0: none)", "consumers": "attached consumers",
            "groups": "consumer groups", "pending": "entries delivered and not yet committed (all groups)",
            "fenced": "1 if the queue is on disk but cannot be opened (GET /api/queues says why)",
        }
        families = {name: GaugeMetricFamily(f"qserve_queue_{name}", help_text, labels=QUEUE_LABELS)
                    for name, help_text in gauges.items()}
        disk = {"bytes": GaugeMetricFamily("qserve_queue_disk_bytes", "bytes of the queue's segment files "
                                           "(local backend)", labels=QUEUE_LABELS),
                "segments": GaugeMetricFamily("qserve_queue_segments", "segment files (local backend)",
                                              labels=QUEUE_LABELS)}
        policy = {"delayed": GaugeMetricFamily("qserve_queue_delayed", "entries a negative commit's delay hides "
                                               "from a group", labels=QUEUE_LABELS),
                  "dead_lettered": CounterMetricFamily("qserve_dead_lettered", "entries moved to the dead-letter "
                                                       "queue (max_deliveries)", labels=QUEUE_LABELS),
                  "timed_out": CounterMetricFamily("qserve_timed_out", "deliveries handed back because the "
                                                   "consumer held them past delivery_timeout", labels=QUEUE_LABELS)}
        commit = {name: (HistogramMetricFamily if name.endswith("_seconds") else CounterMetricFamily)(
                      f"qserve_{name}", help_text, labels=QUEUE_LABELS) for name, help_text in COMMIT_FIGURES.items()}
        group_pending = GaugeMetricFamily("qserve_group_pending", "entries a group delivered and not yet "
                                          "committed", labels=[*QUEUE_LABELS, "group"])
        counters = {name: CounterMetricFamily(f"qserve_{name}", help_text, labels=QUEUE_LABELS)
                    for name, help_text in COUNTERS.items()}
        for found in metrics._every_queue():
            labels, status = found.labels, found.status
            if found.listed:
                figures = {"length": status.length, "first_index": status.first_index,
                           "last_index": status.last_index, "consumers": status.consumers,
                           "groups": status.groups, "pending": found.pending, "fenced": int(status.fenced is not None)}
                for name, value in figures.items():
                    families[name].add_metric(labels, value)
                for name, value in found.disk.items():
                    disk[name].add_metric(labels, value)
                for name, value in found.policy.items():
                    policy[name].add_metric(labels, value)
                for name, value in found.commit.items():
                    if isinstance(value, Histogram):
                        commit[name].add_metric(labels, value.cumulative(), sum_value=value.total)
                    else:
                        commit[name].add_metric(labels, value)
                for group in found.groups:
                    group_pending.add_metric([*labels, group["name"]], group["pending"])
            counted = metrics.meters.queues.get(found.ref)
            for name in COUNTERS:
                counters[name].add_metric(labels, getattr(counted, name) if counted else 0)
        yield from families.values()
        yield from disk.values()
        yield from policy.values()
        yield from commit.values()
        yield group_pending
        yield from counters.values()

    @staticmethod
    def _server(metrics: Metrics):
        meters, edge, watch = metrics.meters, metrics._edge(), metrics._watch()
        requests = CounterMetricFamily("qserve_requests", "requests answered, by operation and status "
                                       "(a WebSocket watch: 101 once accepted)", labels=["operation", "status"])
        for (operation, status), n in sorted(meters.requests.items()):
            requests.add_metric([operation, str(status)], n)
        yield requests
        yield GaugeMetricFamily("qserve_connections_open", "open HTTP connections (WebSockets included)",
                                value=edge.get("connections_open", 0))
        yield GaugeMetricFamily("qserve_websockets_open", "open WebSocket connections",
                                value=edge.get("websockets_open", 0))
        yield GaugeMetricFamily("qserve_watch_sessions", "attached watchers (WebSocket and streamed HTTP)",
                                value=watch.get("sessions", 0))
        idle_poll = edge.get("idle_poll")
        if idle_poll is not None:
            yield CounterMetricFamily("qserve_idle_poll_seconds", "seconds the idle event loop spent polling for "
                                      "arrivals before sleeping (--idle-poll-us)", value=idle_poll["seconds"])
            yield CounterMetricFamily("qserve_idle_poll_hits", "idle polls that an arrival ended (the others "
                                      "went on to sleep)", value=idle_poll["hits"])
            yield CounterMetricFamily("qserve_idle_polls", "idle polls begun", value=idle_poll["polls"])
        yield GaugeMetricFamily("qserve_ready", "1 when GET /readyz answers 200", value=int(metrics.not_ready is None))
        yield GaugeMetricFamily("qserve_storage_up", "0 when the queues' storage could not be listed (Redis down)",
                                value=int(metrics.storage_problem is None))
        if meters.recovery_seconds is not None:
            yield GaugeMetricFamily("qserve_recovery_seconds", "seconds the start-up took to open (recover) every "
                                    "queue that opens at start", value=meters.recovery_seconds)
        if meters.recovered_entries is not None:
            yield GaugeMetricFamily("qserve_recovered_entries", "live entries in the queues opened at start",
                                    value=meters.recovered_entries)
        helps = {"put": ("qserve_put_seconds", "seconds from a put's arrival to its durable answer"),
                 "get": ("qserve_get_seconds", "seconds from a get's arrival to its answer (a long-poll's wait included)"),
                 "first_delivery": ("qserve_put_to_delivery_seconds", "seconds from a put (its ts@ tag) to its "
                                    "entry's first frame written to a watcher")}
        for key, histogram in metrics._histograms().items():
            name, help_text = helps[key]
            yield HistogramMetricFamily(name, help_text, buckets=histogram.cumulative(), sum_value=histogram.total)
