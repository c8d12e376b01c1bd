"""Routing: an HTTP request (method, path, query, headers, body) becomes one `events` operation.

Strategy: a pure function, no I/O, so every rule of PROTOCOL.md's path and parameter handling is
tested without a server. The order of checks is fixed and matters for the status a client sees:
path (404) -> token (401) -> method (405) -> parameters (400). Parameters are checked by
`qserve.wire.params` alone (a bad or missing one is a `ParamError` naming it), and `route` makes
every `ParamError` the 400 with its reason, in one place. Control parameters are the
underscore-wrapped names (`_index_`); every other query parameter is a tag. Unknown control
parameters are ignored and never stored. qserve's own operation on a dead-letter queue, a replay
(``POST .../S/dlq?_replay_=true&_indexes_=...``), is a switch of POST as ``_eos_`` is. qserve's own endpoints under `/api/queues` (list the
queues, create a service's) are matched before the queue paths, so `--root-service` does not take them;
so are `GET /healthz`, `GET /readyz` (no token: load balancers ask them), `GET /metrics` (the
global token, or `--metrics-token` for scrapers), the dashboard's static files under `GET /dashboard`
(no token: they hold no data) and its figures, `GET /api/dashboard` (the token rule of `/api/queues`).
"""

from __future__ import annotations

import functools
import hmac
import urllib.parse
from typing import Callable, Mapping, Sequence

from qserve.core import events as ev
from qserve.wire import names
from qserve.config import Config
from qserve.core.errors import BadRequest, MethodNotAllowed, NotFound, Unauthorized
from qserve.wire.params import (ParamError, parse_bool, parse_duration, parse_index_list, parse_int,
                                required, split_params)

__all__ = ["route", "PutRoutes", "PRODUCER", "ADMIN", "DASHBOARD", "DASHBOARD_DATA", "identity_from", "header_tags",
           "MAX_PRIORITY", "service_problem", "token_opens"]

ADMIN = "/api/queues"          # qserve's own endpoints: list the queues, create a service's queues
DASHBOARD = "/dashboard"       # the dashboard page and its files
DASHBOARD_DATA = "/api/dashboard"   # the figures the dashboard shows (JSON)
MAX_PRIORITY = 2**31 - 1
MAX_TIMEOUT = 3600.0
MAX_DELAY = 24 * 3600.0        # the longest _delay_ of a negative commit
MAX_REPLAY = 1000              # dead letters one replay request moves back
NAME_MAX = 255                 # bytes in a file name (Linux, most file systems): a service's directory
ALLOWED = "GET, POST, PUT, DELETE"

# request headers, lower-cased as h11 delivers them
_USER = names.lower(*names.USER_HEADERS)
_GROUP = names.lower(*names.GROUP_HEADERS)
_PRIORITY = names.PRIORITY_HEADER.lower()
_NOT_TAGGED = {*_USER, *_GROUP, _PRIORITY, names.REQUEST_ID_HEADER.lower(), "authorization"}

Headers = Mapping[str, str]   # lower-case names

#: The user of a POST that names none. A put, an end or a replay consumes nothing, so it needs no
#: fresh consumer id (`identity_from`); one name keeps a put's route a pure function of its head,
#: which `PutRoutes` memoizes.
PRODUCER = "anonymous-producer"


def _producer() -> str:
    return PRODUCER


def route(method: str, path: str, query: Sequence[tuple[str, str]], headers: Headers, body: bytes,
          config: Config, *, anonymous_user: Callable[[], str],
          upgrade: bool = False) -> (ev.Operation | ev.Health | ev.Ready | ev.Metrics | ev.ListQueues | ev.CreateQueue
                                     | ev.DashboardFile | ev.DashboardData):
    """Map one request to an operation.

    Args:
        headers: lower-case header names to their (first) value.
        anonymous_user: gives the user id to use when the request names none (a fresh one per call).
        upgrade: the request asks for a WebSocket upgrade.

    Raises:
        NotFound, Unauthorized, MethodNotAllowed, BadRequest.
    """
    if method == "GET" and path in _SERVER_PATHS:
        return _server_path(path, query, headers, config)
    if path == ADMIN or path.startswith(ADMIN + "/"):   # before --root-service takes every path
        return _admin(method, path, headers, config)
    if method == "GET" and (path == DASHBOARD or path.startswith(DASHBOARD + "/")):
        return ev.DashboardFile(path[len(DASHBOARD) + 1:] or "index.html")
    if path == DASHBOARD_DATA:
        token = _listing_token(headers, config)
        if method != "GET":
            raise MethodNotAllowed(f"method {method} not allowed on {DASHBOARD_DATA}", headers=[("Allow", "GET")])
        return ev.DashboardData(token)
    queue, subpath = _queue_for(path, config)
    if queue is None or (subpath and method != "POST"):
        raise NotFound(f"no queue at {path}")
    _authorize(headers, config, queue.service)
    identity = identity_from(headers, anonymous_user if method != "POST" else _producer)
    try:
        control, tags = split_params(query)
        build = _BY_METHOD.get(method)
        if build is None:
            raise MethodNotAllowed(f"method {method} not allowed on a queue", headers=[("Allow", ALLOWED)])
        return build(queue, identity, control, tags, headers, body, config, subpath, upgrade)
    except ParamError as exc:   # the one place a parameter's problem becomes a 400
        raise BadRequest(str(exc)) from None


class PutRoutes:
    """`route`, with the routes of puts memoized: clients put to a few paths with the same headers
    over and over, and routing a put (path, token, identity, parameters, header tags) was ~4 us of
    the ~16 us `App.handle` took for one (in a loop). A POST's route is a function of its target,
    its headers but Content-Length (the only one routing never reads), and the configuration; the
    body only becomes the put's data. So the key is those two; only puts are kept, never an error.
    Bound: `SIZE` keys, each at most one request head (``max_header_bytes``); the oldest goes first."""

    SIZE = 64

    def __init__(self, config: Config) -> None:
        self._config = config
        self._puts: dict[tuple, tuple[ev.QueueRef, ev.Identity, tuple[tuple[str, str], ...], int]] = {}

    def route(self, method: str, target: str, path: str, query: Sequence[tuple[str, str]],
              headers: Sequence[tuple[str, str]], body: bytes, *, anonymous_user: Callable[[], str],
              upgrade: bool = False):
        """`route` of a request whose ``headers`` are its (name, value) pairs in order, names lower-case."""
        key = None
        if method == "POST":
            key = (target, tuple([h for h in headers if h[0] != "content-length"]))
            put = self._puts.get(key)
            if put is not None:
                queue, identity, tags, priority = put
                return ev.Put(queue, identity, data=body, tags=tags, priority=priority)
        # a repeated header: its first value
        op = route(method, path, query, dict(reversed(headers)), body, self._config,
                   anonymous_user=anonymous_user, upgrade=upgrade)
        if key is not None and type(op) is ev.Put:
            if len(self._puts) >= self.SIZE:
                del self._puts[next(iter(self._puts))]
            self._puts[key] = (op.queue, op.identity, op.tags, op.priority)
        return op


def _queue_for(path: str, config: Config) -> tuple[ev.QueueRef | None, str]:
    """The queue a path names and the custom sub-path of a put ('' if none)."""
    if len(path) <= _MEMO_PATH_MAX:
        return _queue_at(path, config.queues, config.root_service)
    return _parse_queue_path(path, config.queues, config.root_service)


# The memo's bound: 1024 paths of at most 256 characters (~0.5 MB with the cache's own entries).
# Longer paths are parsed every time: no client puts to one over and over, and caching them would
# let a client naming ever new long paths hold megabytes.
_MEMO_PATH_MAX = 256


@functools.lru_cache(maxsize=1024)
def _queue_at(path: str, queues: tuple[str, ...], root_service: str | None) -> tuple[ev.QueueRef | None, str]:
    return _parse_queue_path(path, queues, root_service)


def _parse_queue_path(path: str, queues: tuple[str, ...], root_service: str | None) -> tuple[ev.QueueRef | None, str]:
    # A pure function of its arguments, memoized per path (`_queue_at`): clients put to a few
    # paths over and over, and parsing one (with `service_problem`'s checks) was ~3% of a put's
    # CPU. The QueueRef the memo shares is frozen.
    if path.startswith(names.MOUNT):
        parts = path[len(names.MOUNT):].split("/")
        service, rest = parts[0], parts[1:]
        if service_problem(service) is not None:
            return None, ""
        if queues and service not in queues and service != root_service:
            return None, ""
    elif root_service is not None and path.startswith("/"):
        service, rest = root_service, path[1:].split("/")
    else:
        return None, ""
    while rest and rest[-1] == "":
        rest.pop()            # a trailing slash names the same queue
    if not rest:
        return ev.QueueRef(service), ""
    if rest == ["sink"]:
        return ev.QueueRef(service, sink=True), ""
    if rest == ["dlq"]:
        return ev.QueueRef(service, dlq=True), ""
    return ev.QueueRef(service), "/".join(rest)


def _server_path(path: str, query: Sequence[tuple[str, str]], headers: Headers,
                 config: Config) -> ev.Health | ev.Ready | ev.Metrics:
    """The server's own GET endpoints: health, readiness, metrics."""
    if path == "/healthz":
        return ev.Health()
    if path == "/readyz":
        return ev.Ready()
    _authorize_metrics(headers, config)
    form = dict(query).get("format", "prometheus")
    if form not in ("prometheus", "json"):
        raise BadRequest(f"format: expected prometheus or json, got {form!r}")
    return ev.Metrics(accept=headers.get("accept", ""), json=form == "json")


_SERVER_PATHS = ("/healthz", "/readyz", "/metrics")


def _authorize_metrics(headers: Headers, config: Config) -> None:
    """`GET /metrics` takes the global token (as the API does) or `--metrics-token`; with neither
    configured but per-service tokens, any of those (the figures name every service)."""
    accepted = [t for t in (config.metrics_token, config.token) if t is not None]
    if not accepted:
        accepted = list(config.tokens.values())
    given = _given_token(headers).encode()
    if accepted and not any(hmac.compare_digest(given, t.encode()) for t in accepted):
        raise Unauthorized("missing or wrong token in the Authorization header")


def service_problem(service: str) -> str | None:
    """Why `service` cannot name a queue, or None if it can. Its percent-encoded form is a
    directory name (`queues.queue_dir`), so it must be one a file system takes."""
    if not service or service in (".", "..") or "/" in service:
        return "must not be empty, '.' or '..', nor contain '/'"
    if any(ord(c) < 32 or ord(c) == 127 for c in service):   # they would split log lines
        return "must not contain control characters"
    if len(urllib.parse.quote(service, safe="")) > NAME_MAX:
        return f"too long (at most {NAME_MAX} bytes once percent-encoded)"
    return None


def _admin(method: str, path: str, headers: Headers, config: Config) -> ev.ListQueues | ev.CreateQueue:
    """`GET /api/queues` and `POST /api/queues/{service}`, checked in the order of `route`."""
    service = path[len(ADMIN) + 1:]          # '' for /api/queues and /api/queues/
    if not service:
        token = _listing_token(headers, config)
        if method == "GET":
            return ev.ListQueues(token)
        if method == "POST":
            raise BadRequest(f"no service named: POST {ADMIN}/SERVICE creates SERVICE's input and sink queues")
        raise MethodNotAllowed(f"method {method} not allowed on {ADMIN}", headers=[("Allow", "GET")])
    if "/" in service:
        raise NotFound(f"nothing at {path}")
    if config.queues and service not in config.queues and service != config.root_service:
        raise NotFound(f"no queue named {service} (the server serves the services of --queues only)")
    _authorize(headers, config, service)
    if method != "POST":
        raise MethodNotAllowed(f"method {method} not allowed on {ADMIN}/SERVICE", headers=[("Allow", "POST")])
    problem = service_problem(service)
    if problem is not None:
        raise BadRequest(f"service name {service!r}: {problem}")
    return ev.CreateQueue(service)


def _given_token(headers: Headers) -> str:
    given = headers.get("authorization", "")
    if given[:7].lower() == "bearer ":
        given = given[7:]
    return given.strip()


def token_opens(config: Config, token: str, service: str) -> bool:
    """Does `token` (as the request carried it, without "Bearer ") open `service`'s queues?"""
    expected = config.token_for(service)
    return expected is None or hmac.compare_digest(token.encode(), expected.encode())


def _listing_token(headers: Headers, config: Config) -> str:
    """The token of a `GET /api/queues`. With tokens configured it must be one of them (the
    global one or a service's); the listing then shows the services it opens (`token_opens`)."""
    given = _given_token(headers)
    configured = [t for t in (config.token, *config.tokens.values()) if t is not None]
    if configured and not any(hmac.compare_digest(given.encode(), t.encode()) for t in configured):
        raise Unauthorized("missing or wrong token in the Authorization header")
    return given


def _authorize(headers: Headers, config: Config, service: str) -> None:
    if config.token is None and not config.tokens:   # no token configured: every request is let in
        return
    if not token_opens(config, _given_token(headers), service):
        raise Unauthorized("missing or wrong token in the Authorization header")


def identity_from(headers: Headers, anonymous_user: Callable[[], str]) -> ev.Identity:
    """The consumer a request speaks for: its user and group headers, or ``anonymous_user()``
    (called only then: a fresh id per anonymous request)."""
    group = names.DEFAULT_GROUP
    for name in _GROUP:
        if headers.get(name):
            group = headers[name]
            break
    for name in _USER:
        if headers.get(name):
            return ev.Identity(group, headers[name])
    return ev.Identity(group, anonymous_user(), anonymous=True)


def canonical_header(name: str) -> str:
    """Go's canonical MIME header key: `x-eas-foo` -> `X-Eas-Foo`."""
    if len(name) <= _MEMO_NAME_MAX:
        return _canonical_memo(name)
    return _canonical(name)


# Memoized: a pure function of the few names clients send, on every put. Bound: 1024 names of at
# most 64 characters; a longer name is computed each time.
_MEMO_NAME_MAX = 64


def _canonical(name: str) -> str:
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


_canonical_memo = functools.lru_cache(maxsize=1024)(_canonical)


def header_tags(headers: Headers) -> list[tuple[str, str]]:
    """The `Header:<Name>` tags of a put: Content-Type and X-EAS-* but never identity or auth."""
    out = []
    for name, value in headers.items():
        if name in _NOT_TAGGED:
            continue
        if name == "content-type" or name.startswith("x-eas-"):
            out.append(("Header:" + canonical_header(name), value))
    return out


def _wants_protobuf(headers: Headers) -> bool:
    return names.PROTOBUF in headers.get("accept", "")


def _tag_tuple(tags: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(tags.items())


def _get(queue, identity, control, tags, headers, body, config, subpath, upgrade):
    if parse_bool("_attrs_", control.get("_attrs_"), False):
        return ev.Attributes(queue, identity, protobuf=_wants_protobuf(headers))
    if parse_bool("_search_", control.get("_search_"), False):
        return ev.Search(queue, identity, parse_int("_index_", control.get("_index_"), 0, minimum=0))
    if parse_bool("_count_", control.get("_count_"), False):
        prio = control.get("_priority_")
        priority = None if prio is None else parse_int("_priority_", prio, 0, minimum=0, maximum=MAX_PRIORITY)
        return ev.Count(queue, identity, priority=priority, tags=_tag_tuple(tags))
    if parse_bool("_watch_", control.get("_watch_"), False):
        return ev.Watch(
            queue, identity,
            start=parse_int("_index_", control.get("_index_"), 0, minimum=-1),
            window=parse_int("_window_", control.get("_window_"), 10, minimum=1, maximum=config.max_watch_window),
            index_only=parse_bool("_index_only_", control.get("_index_only_"), False),
            auto_commit=parse_bool("_auto_commit_", control.get("_auto_commit_"), False),
            tags=_tag_tuple(tags), websocket=upgrade)
    return ev.Get(
        queue, identity,
        start=parse_int("_index_", control.get("_index_"), 0, minimum=-1),
        length=parse_int("_length_", control.get("_length_"), 1, minimum=1, maximum=config.max_get_length),
        timeout=min(parse_duration("_timeout_", control.get("_timeout_"), 0.0), MAX_TIMEOUT),
        auto_delete=parse_bool("_auto_delete_", control.get("_auto_delete_"), True),
        raw=parse_bool("_raw_", control.get("_raw_"), True),
        protobuf=_wants_protobuf(headers),
        tags=_tag_tuple(tags))


def _post(queue, identity, control, tags, headers, body, config, subpath, upgrade):
    if parse_bool("_eos_", control.get("_eos_"), False):
        return ev.End(queue, identity, force=parse_bool("_force_", control.get("_force_"), False))
    if parse_bool("_replay_", control.get("_replay_"), False):
        return _replay(queue, identity, control)
    prio = control.get("_priority_")
    if prio is None:
        prio = headers.get(_PRIORITY)
        name = "X-EAS-QueueService-Priority"
    else:
        name = "_priority_"
    priority = parse_int(name, prio, 0, minimum=0, maximum=MAX_PRIORITY)
    all_tags = dict(tags)
    for key, value in header_tags(headers):
        all_tags.setdefault(key, value)
    if subpath:
        all_tags["_path_"] = subpath
    return ev.Put(queue, identity, data=body, tags=_tag_tuple(all_tags), priority=priority)


def _replay(queue, identity, control) -> ev.Replay:
    """``POST {service}/dlq?_replay_=true&_indexes_=1,2`` (or ``_index_=N``): qserve's own."""
    if not queue.dlq:
        raise ParamError("_replay_", f"only a dead-letter queue replays its entries ({queue.name} is not "
                         f"one: {names.MOUNT}{queue.service}/dlq is)")
    if control.get("_indexes_") is not None:
        indexes = parse_index_list("_indexes_", control["_indexes_"])
    else:
        if control.get("_index_") is None:
            raise ParamError("_indexes_", "required with _replay_ (or _index_)")
        indexes = [parse_int("_index_", control["_index_"], 0, minimum=0)]
    if len(indexes) > MAX_REPLAY:
        raise ParamError("_indexes_", f"at most {MAX_REPLAY} indexes a replay")
    return ev.Replay(queue, identity, tuple(indexes))


def _delete(queue, identity, control, tags, headers, body, config, subpath, upgrade):
    if parse_bool("_trunc_", control.get("_trunc_"), False):
        index = required("_index_", control.get("_index_"), "with _trunc_")
        return ev.Truncate(queue, identity, parse_int("_index_", index, 0, minimum=0))
    if control.get("_indexes_") is not None:
        return ev.Delete(queue, identity, tuple(parse_index_list("_indexes_", control["_indexes_"])))
    if control.get("_index_") is not None:
        return ev.Delete(queue, identity, (parse_int("_index_", control["_index_"], 0, minimum=0),))
    raise ParamError("_indexes_", "required (or _index_)")


def _put(queue, identity, control, tags, headers, body, config, subpath, upgrade):
    indexes = tuple(parse_index_list("_indexes_", required("_indexes_", control.get("_indexes_"))))
    if not parse_bool("_negative_", control.get("_negative_"), False):
        return ev.Commit(queue, identity, indexes)
    form = dict(control)
    if body:
        try:
            form.update(urllib.parse.parse_qsl(body.decode("utf-8"), keep_blank_values=True))
        except UnicodeDecodeError:
            raise BadRequest("negative commit: the form body is not UTF-8") from None
    code, reason = form.get("_code_", ""), form.get("_reason_", "")
    if len(code) > 64 or len(reason) > 1024:
        raise ParamError("_code_/_reason_", "too long (64 / 1024 characters at most)")
    delay = None
    if form.get("_delay_") is not None:
        delay = parse_duration("_delay_", form["_delay_"], 0.0)
        if delay > MAX_DELAY:
            raise ParamError("_delay_", f"at most {MAX_DELAY:g} s (24h)")
    return ev.Negative(queue, identity, indexes, code=code, reason=reason, delay=delay)


_BY_METHOD = {"GET": _get, "POST": _post, "DELETE": _delete, "PUT": _put}
