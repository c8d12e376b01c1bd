"""qserve's own queue client: trio + h11 for HTTP, trio-websocket for watch, `qserve.wire.protobuf` for frames.

Strategy: `QueueClient` is a thin async mapping of each queue operation (PROTOCOL.md section 5) onto
one HTTP request over a small keep-alive pool (`client.http`); `watch` returns a reconnecting
`Watcher` (`client.watch`); `BlockingQueueClient` (`client.blocking`) runs the same client on a
trio loop in a background thread for scripts. It does not depend on the official ``eas_prediction``.

Retries (``retries`` extra attempts, with a short bounded backoff):
- idempotent calls (attributes, search, count, delete, commit, truncate, and get with
  ``auto_delete=False``) are retried after any connection failure or timeout;
- a put is retried only when the connection failed before any byte of the response arrived. The
  server may still have stored the entry before the connection broke, so a retried put can store it
  twice: puts are **at-least-once** (the duplicate has its own index; pass a ``requestId`` tag to
  recognise it, since the server honours a client-supplied request id);
- an auto-deleting get, a negative commit, end and a replay are never retried (a retry could
  lose or double-count entries; a replay's would be a 404 for what the first one moved).
Non-2xx answers are never retried: they raise `QueueError` at once.

Instances are task-safe: concurrent calls share the pool (at most ``max_connections`` requests in
flight, the rest wait for a connection).
"""

from __future__ import annotations

import json
import ssl
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Mapping

import trio
import trio_websocket

from qserve.wire import framing, names, protobuf
from qserve.client.http import ConnectError, ConnectionPool, QueueError, QueueTimeout, QueueURL, Response, reason_from
from qserve.client.watch import Watcher

__all__ = ["QueueClient", "Entry"]

#: One queue entry: ``index``, ``tags`` (dict), ``data`` (bytes) and ``message`` (usually empty).
Entry = protobuf.Frame

_MAX_BACKOFF = 1.0


def _duration(seconds: float) -> str:
    """A Go-style duration the server parses: ``0s``, ``5s``, ``1500ms``."""
    if seconds < 0:
        raise ValueError("timeout must be >= 0")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def _indexes(indexes: int | Iterable[int]) -> str:
    items = [indexes] if isinstance(indexes, int) else list(indexes)
    if not items:
        raise ValueError("no indexes given")
    for i in items:
        if not isinstance(i, int) or i < 0:
            raise ValueError(f"index must be a non-negative int, got {i!r}")
    return ",".join(map(str, items))


def _tag_params(tags: Mapping[str, str] | None) -> list[tuple[str, str]]:
    out = []
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"tags must be str to str, got {key!r}: {value!r}")
        if not key or (key.startswith("_") and key.endswith("_") and len(key) > 2):
            raise ValueError(f"tag key {key!r} is reserved (system parameters look like _name_)")
        out.append((key, value))
    return out


class QueueClient:
    """An async client of one queue. Task-safe.

    Args:
        url: ``http://host:port/api/predict/SVC`` (input queue) or ``.../SVC/sink``; in root mode
            ``http://host:port/`` and ``http://host:port/sink``. ``https`` works too (``wss`` for watch).
        token: sent as ``Authorization`` on every request, when given.
        user, group: the identity (``X-EAS-QueueService-Uid`` / ``-Gid``); user defaults to a
            random uuid4 per client, as in the official SDKs, so two clients never share a consumer id.
        timeout: seconds for one request (a long-poll get adds its own wait to it) and for a
            watch handshake.
        retries: extra attempts for retryable failures (see the module docstring).
        max_connections: keep-alive connections in the pool.
        ssl_context: for https/wss URLs.

    Raises:
        ValueError: a malformed URL or setting.
    """

    def __init__(self, url: str, *, token: str | None = None, user: str | None = None, group: str = "eas",
                 timeout: float = 10.0, retries: int = 2, max_connections: int = 4,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if timeout <= 0 or retries < 0:
            raise ValueError("timeout must be > 0 and retries >= 0")
        self.url = QueueURL.parse(url) if isinstance(url, str) else url
        self.token = token
        self.user = user or str(uuid.uuid4())
        self.group = group
        self.timeout = timeout
        self.retries = retries
        self.max_connections = max_connections
        self._ssl_context = ssl_context
        self._pool = ConnectionPool(self.url, max_connections, ssl_context)

    def __repr__(self) -> str:
        return f"QueueClient({str(self.url)!r}, group={self.group!r}, user={self.user!r})"

    def sink(self) -> "QueueClient":
        """A client of this service's sink queue, with the same settings and identity (its own pool)."""
        return QueueClient(str(self.url.sink()), token=self.token, user=self.user, group=self.group,
                           timeout=self.timeout, retries=self.retries, max_connections=self.max_connections,
                           ssl_context=self._ssl_context)

    # ------------------------------------------------------------------------------ plumbing

    def _headers(self, extra: Iterable[tuple[str, str]] = ()) -> list[tuple[str, str]]:
        headers = [("Host", self.url.host_header), ("User-Agent", "qserve-client"),
                   (names.USER_HEADER, self.user), (names.GROUP_HEADER, self.group)]
        if self.token is not None:
            headers.append(("Authorization", self.token))
        headers.extend(extra)
        return headers

    def _target(self, query: list[tuple[str, str]], path: str | None = None) -> str:
        base = self.url.path
        if path:
            base = base.rstrip("/") + "/" + urllib.parse.quote(path.strip("/"), safe="/")
        if not query:
            return base
        return base + "?" + urllib.parse.urlencode(query, quote_via=urllib.parse.quote, safe="")

    async def _call(self, method: str, query: list[tuple[str, str]], *, body: bytes = b"",
                    headers: Iterable[tuple[str, str]] = (), retry: str = "always", path: str | None = None,
                    wait: float = 0.0, ok: tuple[int, ...] = (200,)) -> Response:
        """One request with the retry policy ``retry``: "always", "before-response" or "never"."""
        target = self._target(query, path)
        all_headers = self._headers(headers)
        if body or method in ("POST", "PUT"):
            all_headers.append(("Content-Length", str(len(body))))
        attempt = 0
        while True:
            try:
                response = await self._pool.request(method, target, all_headers, body,
                                                    timeout=self.timeout + wait)
                break
            except ConnectError as exc:
                retryable = (retry == "always" or (retry == "before-response" and not exc.response_started
                                                   and not isinstance(exc, QueueTimeout)))
                if not retryable or attempt >= self.retries:
                    raise
            attempt += 1
            await trio.sleep(min(0.1 * 2 ** (attempt - 1), _MAX_BACKOFF))
        if response.status not in ok:
            raise QueueError(response.status, reason_from(response.status, response.phrase, response.body))
        return response

    def _open_websocket(self, resource: str):
        headers = [(k.encode(), v.encode()) for k, v in self._headers([("Accept", names.PROTOBUF)]) if k != "Host"]
        use_ssl: bool | ssl.SSLContext = False
        if self.url.scheme == "https":
            use_ssl = self._ssl_context or True
        return trio_websocket.open_websocket(
            self.url.host, self.url.port, resource, use_ssl=use_ssl, extra_headers=headers,
            max_message_size=framing.DEFAULT_MAX_FRAME_SIZE, connect_timeout=self.timeout,
            disconnect_timeout=1.0)

    # ---------------------------------------------------------------------------- operations

    async def put(self, data: bytes, tags: Mapping[str, str] | None = None, *, priority: int = 0,
                  path: str | None = None) -> tuple[int, str]:
        """Append one entry. Returns ``(index, request_id)``.

        Args:
            data: the payload.
            tags: stored with the entry (a ``requestId`` tag becomes the request id).
            priority: >0 is dispatched to watchers first.
            path: a custom sub-path (``POST .../SVC/a/b``), kept by the server as the tag ``_path_``.

        Raises:
            QueueError: 409 (queue ended), 413 (too large), 429 (full), 401, ...; ConnectError.
        """
        if priority < 0:
            raise ValueError("priority must be >= 0")
        query = _tag_params(tags)
        if priority:
            query.append(("_priority_", str(priority)))
        response = await self._call("POST", query, body=bytes(data), retry="before-response", path=path)
        try:
            return int(response.body), response.headers[names.REQUEST_ID_HEADER.lower()]
        except (ValueError, KeyError):
            raise QueueError(response.status, "malformed put answer from server") from None

    async def get(self, *, index: int = 0, length: int = 1, timeout: float = 0.0, auto_delete: bool = True,
                  request_id: str | None = None, tags: Mapping[str, str] | None = None) -> list[Entry]:
        """Read up to ``length`` entries from ``index`` on (0 = the head); ``[]`` if none.

        ``timeout`` > 0 long-polls: the server waits up to that long for a matching entry (the
        request timeout is extended by it). Auto-deleting gets are not retried.
        """
        if length < 1:
            raise ValueError("length must be >= 1")
        query = [("_index_", str(index)), ("_length_", str(length)), ("_timeout_", _duration(timeout)),
                 ("_raw_", "false"), ("_auto_delete_", "true" if auto_delete else "false")]
        if request_id is not None:
            query.append(("requestId", request_id))
        query += _tag_params(tags)
        response = await self._call("GET", query, headers=[("Accept", names.PROTOBUF)], wait=timeout,
                                    retry="never" if auto_delete else "always", ok=(200, 204))
        if response.status == 204 or not response.body:
            return []
        try:
            return protobuf.decode_frame_list(response.body)
        except protobuf.DecodeError as exc:
            raise QueueError(response.status, f"undecodable get answer: {exc}") from None

    async def attributes(self) -> dict[str, str]:
        """The queue's attributes (``stream.length``, ``meta.state``, ...), all values strings."""
        response = await self._call("GET", [("_attrs_", "true")], headers=[("Accept", names.PROTOBUF)])
        try:
            return protobuf.decode_attributes(response.body)
        except protobuf.DecodeError as exc:
            raise QueueError(response.status, f"undecodable attributes: {exc}") from None

    async def delete(self, indexes: int | Iterable[int]) -> None:
        """Delete entries; unknown indexes are harmless."""
        await self._call("DELETE", [("_indexes_", _indexes(indexes))])

    async def truncate(self, index: int) -> None:
        """Delete every entry with an index below ``index``."""
        await self._call("DELETE", [("_index_", _indexes(index)), ("_trunc_", "true")])

    async def commit(self, indexes: int | Iterable[int]) -> None:
        """Acknowledge (and so delete) delivered entries; frees window slots of this identity's watcher."""
        await self._call("PUT", [("_indexes_", _indexes(indexes))])

    async def negative(self, indexes: int | Iterable[int], code: str = "", reason: str = "", *,
                       delay: float | None = None) -> None:
        """Give delivered entries back for redelivery, recording ``code``/``reason`` as the tags
        ``lastCode``/``lastReason``; ``delay`` seconds later (qserve's ``_delay_``; None: at once,
        or after the queue's ``retry_backoff``). Not retried."""
        form = [("_code_", code), ("_reason_", reason)] + ([("_delay_", f"{delay:g}")] if delay is not None else [])
        body = urllib.parse.urlencode(form).encode()
        await self._call("PUT", [("_indexes_", _indexes(indexes)), ("_negative_", "true")], body=body,
                         headers=[("Content-Type", "application/x-www-form-urlencoded")], retry="never")

    async def search(self, index: int) -> dict:
        """``{"IsPending": bool, "WaitCount": n}`` for an entry, ``{}`` if it is unknown."""
        response = await self._call("GET", [("_search_", "true"), ("_index_", _indexes(index))])
        try:
            return json.loads(response.body or b"{}")
        except ValueError:
            raise QueueError(response.status, "undecodable search answer") from None

    async def count(self, *, priority: int | None = None, tags: Mapping[str, str] | None = None) -> int:
        """How many stored entries match ``priority`` (when given) and every tag."""
        query = [("_count_", "true")]
        if priority is not None:
            query.append(("_priority_", str(priority)))
        query += _tag_params(tags)
        response = await self._call("GET", query)
        try:
            return int(response.body.strip())
        except ValueError:
            raise QueueError(response.status, "undecodable count answer") from None

    async def replay(self, indexes: int | Iterable[int]) -> list[dict]:
        """qserve's own, on a dead-letter queue (``.../SERVICE/dlq``): move these dead letters back
        into their queues (``dlq.queue``) with their data, priority, requestId and own tags, under
        new indexes, and delete them here, in one request. Returns one dict per letter, in the
        order given: ``index`` (here), ``queue``, ``replayed_index``, ``request_id``, ``priority``.
        Not retried: a replay that went through answers a retry 404 (nothing is stored twice).

        Raises:
            QueueError: 404 naming the indexes not here, 400 (not a dead-letter queue, or an entry
                that is not a dead letter), 409/429 (its queue ended or is full): nothing moved;
                ConnectError (it may have gone through: look for the requestIds in the queues).
        """
        response = await self._call("POST", [("_replay_", "true"), ("_indexes_", _indexes(indexes))], retry="never")
        try:
            return list(json.loads(response.body)["replayed"])
        except (ValueError, KeyError, TypeError):
            raise QueueError(response.status, "undecodable replay answer") from None

    async def end(self, *, force: bool = False) -> None:
        """End the queue: later puts get 409; with ``force`` undelivered entries are dropped. Not retried."""
        query = [("_eos_", "true")] + ([("_force_", "true")] if force else [])
        await self._call("POST", query, retry="never")

    def watch(self, *, index: int = 0, window: int = 10, index_only: bool = False, auto_commit: bool = False,
              tags: Mapping[str, str] | None = None, reconnect_delay: float = 1.0,
              ping_interval: float = 10.0, on_link: Callable[[bool, str], None] | None = None) -> Watcher:
        """Subscribe: ``async with client.watch(...) as w: async for entry in w: ...``.

        Entries arrive in dispatch order, at most ``window`` uncommitted ones at a time (commit
        them with `commit` or `negative`, from this client or any client with the same identity).
        The subscription reconnects after any disconnect (after ``reconnect_delay`` seconds, until
        the block exits), so uncommitted entries the server redelivers arrive again.
        ``on_link(up, reason)`` hears of each lost server and each reconnect (see `Watcher`); from
        a `BlockingQueueClient` it is called on the client's loop thread.

        Raises (on entering the block):
            QueueError: the first handshake was refused with a 4xx (401 bad token, 400 bad parameter).
        """
        if window < 1:
            raise ValueError("window must be >= 1")
        if reconnect_delay < 0:
            raise ValueError("reconnect_delay must be >= 0")
        query = [("_watch_", "true"), ("_index_", str(index)), ("_window_", str(window)),
                 ("_index_only_", "true" if index_only else "false"),
                 ("_auto_commit_", "true" if auto_commit else "false")] + _tag_params(tags)
        return Watcher(self._open_websocket, self._target(query), timeout=self.timeout,
                       reconnect_delay=reconnect_delay, ping_interval=ping_interval, on_link=on_link)

    async def aclose(self) -> None:
        """Close the idle connections; the client must not be used afterwards."""
        await self._pool.aclose()

    async def __aenter__(self) -> "QueueClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.aclose()

