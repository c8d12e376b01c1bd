"""The operations a request can ask of a queue, as frozen dataclasses that validate themselves.

Strategy: `routing.route()` turns an HTTP request into exactly one of these (or raises a
`ClientError`); `app.App` dispatches on the type. Nothing here does I/O, so the mapping from the
wire to operations is tested without a server (h11 `_events.py` is the model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qserve.core.errors import BadRequest

__all__ = [
    "QueueRef", "Identity", "Operation", "Put", "Get", "Delete", "Replay", "Truncate", "Commit", "Negative",
    "Attributes", "Search", "Count", "End", "Watch", "Health", "Ready", "Metrics", "ListQueues", "CreateQueue",
    "DashboardFile", "DashboardData", "ConsumerSpec",
]


@dataclass(frozen=True, slots=True)
class QueueRef:
    """One queue: a service's input queue, its sink or its dead-letter queue (`core.policy`)."""

    service: str
    sink: bool = False
    dlq: bool = False

    def __post_init__(self) -> None:
        if not self.service or "/" in self.service or self.service in (".", ".."):
            raise ValueError(f"bad service name {self.service!r}")
        if self.sink and self.dlq:
            raise ValueError("a queue is a sink or a dead-letter queue, not both")

    @property
    def kind(self) -> str:
        """``input``, ``sink`` or ``dlq``: the last part of its path, its directory, its metrics label."""
        return "sink" if self.sink else "dlq" if self.dlq else "input"

    @property
    def name(self) -> str:
        return self.service if not (self.sink or self.dlq) else f"{self.service}/{self.kind}"

    @property
    def order(self) -> tuple[str, int]:
        """Sort key of listings: by service, then input, sink, dead-letter queue."""
        return (self.service, ("input", "sink", "dlq").index(self.kind))

    @classmethod
    def of_kind(cls, service: str, kind: str) -> "QueueRef":
        """The queue of ``service`` named by its `kind`."""
        return cls(service, sink=kind == "sink", dlq=kind == "dlq")


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking: the consumer id is ``{group}.{user}``."""

    group: str
    user: str
    anonymous: bool = False

    @property
    def consumer_id(self) -> str:
        return f"{self.group}.{self.user}"


@dataclass(frozen=True, slots=True)
class Operation:
    queue: QueueRef
    identity: Identity


@dataclass(frozen=True, slots=True)
class Put(Operation):
    data: bytes
    tags: tuple[tuple[str, str], ...]
    priority: int = 0

    def __post_init__(self) -> None:
        if self.priority < 0:
            raise ValueError("priority must be >= 0")


@dataclass(frozen=True, slots=True)
class Get(Operation):
    start: int = 0                     # 0 = head, -1 = only entries put after the request
    length: int = 1
    timeout: float = 0.0               # seconds to long-poll
    auto_delete: bool = True
    raw: bool = True
    protobuf: bool = False             # Accept asked for protobuf
    tags: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.length < 1 or self.start < -1 or self.timeout < 0:
            raise ValueError("bad get parameters")


@dataclass(frozen=True, slots=True)
class Delete(Operation):
    indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Replay(Operation):
    """Move dead letters (their dead-letter queue's ``indexes``) back into their queues (qserve's own)."""

    indexes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.queue.dlq:
            raise ValueError("only a dead-letter queue replays its entries")
        if not self.indexes:
            raise ValueError("a replay names at least one index")


@dataclass(frozen=True, slots=True)
class Truncate(Operation):
    below: int


@dataclass(frozen=True, slots=True)
class Commit(Operation):
    indexes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Negative(Operation):
    indexes: tuple[int, ...]
    code: str = ""
    reason: str = ""
    delay: float | None = None         # _delay_ (seconds): hidden from the group until then


@dataclass(frozen=True, slots=True)
class Attributes(Operation):
    protobuf: bool = False


@dataclass(frozen=True, slots=True)
class Search(Operation):
    index: int


@dataclass(frozen=True, slots=True)
class Count(Operation):
    priority: int | None = None
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class End(Operation):
    force: bool = False


@dataclass(frozen=True, slots=True)
class Watch(Operation):
    start: int = 0
    window: int = 10
    index_only: bool = False
    auto_commit: bool = False
    tags: tuple[tuple[str, str], ...] = ()
    websocket: bool = True             # False: length-delimited HTTP streaming watch

    def __post_init__(self) -> None:
        if self.window < 1 or self.start < -1:
            raise ValueError("bad watch parameters")


@dataclass(frozen=True, slots=True)
class Health:
    """The server's own liveness endpoint (`GET /healthz`)."""


@dataclass(frozen=True, slots=True)
class Ready:
    """The server's readiness endpoint (`GET /readyz`): 200 once it can serve, else 503 and why."""


@dataclass(frozen=True, slots=True)
class Metrics:
    """`GET /metrics`: the server's figures in Prometheus's text format (as ``accept`` negotiates),
    or as one JSON document (``json``: ``?format=json``, for the dashboard)."""

    accept: str = ""
    json: bool = False


@dataclass(frozen=True, slots=True)
class DashboardFile:
    """`GET /dashboard[/NAME]`: one of the dashboard page's static files (no token: they hold no
    data; the page asks `DashboardData` with the token)."""

    name: str = "index.html"


@dataclass(frozen=True, slots=True)
class DashboardData:
    """`GET /api/dashboard` (a qserve extension): the figures the dashboard shows, of the services
    ``token`` opens (checked by routing as for `ListQueues`) and of the server."""

    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class ListQueues:
    """`GET /api/queues` (a qserve extension): the open and fenced queues the caller's token opens.

    ``token`` is what the request's Authorization carried ("" if nothing), to pick the services
    it opens; routing has already refused one that is none of the configured tokens.
    """

    token: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class CreateQueue:
    """`POST /api/queues/{service}` (a qserve extension): create the service's input and sink."""

    service: str

    def __post_init__(self) -> None:
        QueueRef(self.service)   # the same rule as every queue name


@dataclass(frozen=True)
class ConsumerSpec:
    """How one watcher wants to consume: its identity, window, mode, start and tag filter.

    Args:
        group, user: non-empty; the consumer id is ``f"{group}.{user}"``.
        window: >= 1; manual commit: max delivered-but-uncommitted entries; auto-commit: max
            entries handed out but not yet confirmed written (`Dispatcher.sent`).
        auto_commit: whether the edge deletes each entry as it sends it.
        start: 0 = from the head; N > 0 = only entries with index >= N; -1 = only entries put
            after the attach.
        tags: filter; only entries whose tags contain all these key/value pairs. Normalised to
            a sorted tuple; a mapping is accepted too.

    Raises:
        BadRequest: a value out of range (the edge maps it to a 400).
    """

    group: str
    user: str
    window: int = 10
    auto_commit: bool = False
    start: int = 0
    tags: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("group", "user"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise BadRequest(f"consumer {name} must be a non-empty string")
        if not _is_int(self.window) or self.window < 1:
            raise BadRequest("consumer window must be an integer >= 1")
        if not _is_int(self.start) or self.start < -1:
            raise BadRequest("consumer start must be an integer >= -1")
        if not isinstance(self.auto_commit, bool):
            raise BadRequest("consumer auto_commit must be a boolean")
        pairs = list(self.tags.items()) if isinstance(self.tags, Mapping) else list(self.tags)
        seen: dict[str, str] = {}
        for pair in pairs:
            if (not isinstance(pair, tuple) or len(pair) != 2
                    or not all(isinstance(p, str) for p in pair)):
                raise BadRequest("tag filters must be (key, value) string pairs")
            key, value = pair
            if seen.setdefault(key, value) != value:
                raise BadRequest(f"tag filter {key!r} given twice with different values")
        object.__setattr__(self, "tags", tuple(sorted(seen.items())))

    @property
    def id(self) -> str:
        return f"{self.group}.{self.user}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
