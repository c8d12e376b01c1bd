"""The clients `load` runs against the server, and their tallies (not a public API).

Strategy: every client is one small trio task (or, for the probe, one thread with blocking
sockets) that counts into a tally owned by the run - no locks, since each tally is only touched
from the trio thread. What runs and why is described in the docstring of `load`:
- `keepalive_client` / `open_connections`: the keep-alive connections, a request every ~interval s;
- `producer`: open-loop puts at a fixed rate over a few connections;
- `watcher`: one WebSocket watcher, with its manual commits batched by `lib.CommitBatcher`
  on a `CommitConn` (reopened once if the server closed it while idle);
- `slow_loris` / `loris_ok`: the slow-loris connections and the verdict on their cut;
- `probe_loop`: the fresh-client probe thread.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from dataclasses import dataclass, field

import trio
import trio_websocket

from qserve.wire.protobuf import decode_frame
from qserve.wire.names import PROTOBUF

from . import drive, lib as bl

SERVICE = "load"
LORIS_SERVICE = "loris"
GROUP = "load-group"
BODY = b"x" * 100
PRODUCER_CONNECTIONS = 4
LORIS_KINDS = ("head", "body", "idle")


# -------------------------------------------------------------------------------- tallies

@dataclass
class Tally:
    """Counts of one kind of client (one trio thread: no locks)."""
    ok: int = 0
    errors: int = 0
    first_error: str | None = None
    latencies_ns: list[int] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or msg


@dataclass
class WatchTally:
    received: int = 0
    duplicates: int = 0
    committed: int = 0
    commits: int = 0
    reopened: int = 0          # commit connections reopened after a keep-alive close
    connected: int = 0
    errors: int = 0
    first_error: str | None = None
    seen: set[int] = field(default_factory=set)
    per_watcher: list[int] = field(default_factory=list)

    def error(self, msg: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or msg


@dataclass
class LorisResult:
    kind: str
    timeout: float             # the server timeout that should cut it
    cut_after: float | None    # seconds from the first byte (or the connect) to the cut
    status: int | None         # the response status seen, None when closed without one
    note: str = ""


# ------------------------------------------------------------------------------ keep-alive load

async def keepalive_client(conn: bl.HTTPConn, raw: bytes, interval: float, tally: Tally) -> None:
    """One keep-alive connection: a request every ~`interval` s until cancelled; stops on error."""
    clock = time.perf_counter_ns
    await trio.sleep(random.uniform(0, interval))
    while True:
        t0 = clock()
        try:
            status, _, body = await conn.request(raw)
        except (bl.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            tally.error(f"keep-alive connection lost: {type(exc).__name__}: {exc}")
            return
        tally.latencies_ns.append(clock() - t0)
        if status == 200:
            tally.ok += 1
        else:
            tally.error(f"keep-alive request: {status} {body[:80]!r}")
        await trio.sleep(interval * random.uniform(0.5, 1.5))


async def open_connections(port: int, count: int, tally: Tally, concurrency: int = 64) -> list[bl.HTTPConn]:
    conns: list[bl.HTTPConn] = []
    limit = trio.Semaphore(concurrency)

    async def one() -> None:
        async with limit:
            try:
                conns.append(await bl.HTTPConn.open(port))
            except OSError as exc:
                tally.error(f"connect: {exc}")

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return conns


async def producer(port: int, token: str, rate: float, tally: Tally) -> None:
    """Puts at `rate` per second (open loop over a few connections) until cancelled."""
    raw = bl.request_bytes("POST", f"/api/predict/{SERVICE}", port, body=BODY, headers=bl.auth_headers(token))
    conns = [await bl.HTTPConn.open(port) for _ in range(PRODUCER_CONNECTIONS)]
    clock = time.perf_counter_ns
    start = clock()
    slots = iter(range(1 << 62))

    async def worker(conn: bl.HTTPConn) -> None:
        while True:
            due = start + int(next(slots) * 1e9 / rate)
            now = clock()
            if due > now:
                await trio.sleep((due - now) / 1e9)
            t0 = clock()
            try:
                status, _, body = await conn.request(raw)
            except (bl.ProtocolError, trio.BrokenResourceError, OSError) as exc:
                tally.error(f"put connection lost: {type(exc).__name__}: {exc}")
                return
            tally.latencies_ns.append(clock() - t0)
            if status == 200:
                tally.ok += 1
            else:
                tally.error(f"put: {status} {body[:80]!r}")

    await drive.on_each(conns, worker)


# ---------------------------------------------------------------------------------- watchers

class CommitConn:
    """A keep-alive connection for commits, reopened (one retry) when the server closed it while
    idle; commits are idempotent, so a retry is harmless."""

    def __init__(self, port: int, tally: WatchTally) -> None:
        self.port = port
        self.tally = tally
        self.conn: bl.HTTPConn | None = None

    async def request(self, raw: bytes) -> tuple[int, bytes, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = await bl.HTTPConn.open(self.port)
            try:
                return await self.conn.request(raw)
            except (bl.ProtocolError, trio.BrokenResourceError, OSError):
                await self.aclose()
                if attempt:
                    raise
                self.tally.reopened += 1
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        if self.conn is not None:
            await trio.aclose_forcefully(self.conn.stream)
            self.conn = None


async def watcher(n: int, port: int, token: str, window: int, manual: bool, tally: WatchTally,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
    """One WebSocket watcher; with `manual`, commits what it received (one commit in flight)."""
    uid = f"watcher{n}"
    url = (f"ws://{bl.LOCALHOST}:{port}/api/predict/{SERVICE}?_watch_=true&_index_=0&_window_={window}"
           f"&_auto_commit_={'false' if manual else 'true'}")
    headers = [(b"Authorization", token.encode()), (b"X-EAS-QueueService-Uid", uid.encode()),
               (b"X-EAS-QueueService-Gid", GROUP.encode()), (b"Accept", PROTOBUF.encode())]
    commit_headers = [("Authorization", token), ("X-EAS-QueueService-Uid", uid), ("X-EAS-QueueService-Gid", GROUP)]
    tally.per_watcher.append(0)
    started = False
    conn = CommitConn(port, tally) if manual else None
    committer = drive.CommitBatcher(conn, port, SERVICE, commit_headers, tally) if conn is not None else None
    try:
        async with trio_websocket.open_websocket_url(url, extra_headers=headers, connect_timeout=10,
                                                     disconnect_timeout=2) as ws:
            tally.connected += 1
            started = True
            task_status.started()
            async with trio.open_nursery() as nursery:
                if committer is not None:
                    nursery.start_soon(committer.run)
                while True:
                    index = decode_frame(await ws.get_message()).index
                    if index in tally.seen:
                        tally.duplicates += 1
                    else:
                        tally.seen.add(index)
                        tally.received += 1
                        tally.per_watcher[n] += 1
                    if committer is not None:
                        committer.add(index)
    except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, bl.ProtocolError,
            trio.BrokenResourceError, OSError, trio.TooSlowError) as exc:
        tally.error(f"watcher {n}: {type(exc).__name__}: {exc}")
    finally:
        if conn is not None:
            await conn.aclose()
        if not started:
            task_status.started()


# -------------------------------------------------------------------------------- slow-loris

def loris_payload(kind: str, port: int, token: str) -> tuple[bytes, bytes]:
    """(sent at once, then trickled one byte at a time) for a slow-loris connection of `kind`."""
    if kind == "head":
        head = bl.request_bytes("GET", f"/api/predict/{LORIS_SERVICE}?_attrs_=true", port,
                                headers=bl.auth_headers(token))
        return head[:1], head[1:]
    if kind == "body":
        request = bl.request_bytes("POST", f"/api/predict/{LORIS_SERVICE}", port, body=b"x" * 1000,
                                   headers=bl.auth_headers(token))
        cut = request.index(b"\r\n\r\n") + 5   # the head and one body byte
        return request[:cut], request[cut:]
    return b"", b""


async def slow_loris(kind: str, port: int, token: str, *, interval: float, timeout: float, slack: float,
                     results: list[LorisResult]) -> None:
    """Connect, send per `kind`, and wait (bounded) for the server to answer or close."""
    first, rest = loris_payload(kind, port, token)
    try:
        stream = await trio.open_tcp_stream(bl.LOCALHOST, port)
    except OSError as exc:
        results.append(LorisResult(kind, timeout, None, None, f"connect: {exc}"))
        return
    data, note, cut_at = b"", "", None

    async def trickle() -> None:
        try:
            for i in range(len(rest)):
                await trio.sleep(interval)
                await stream.send_all(rest[i:i + 1])
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed: the reader sees it

    try:
        if first:
            await stream.send_all(first)
        t0 = time.perf_counter()
        with trio.move_on_after(timeout + slack + 1.0):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    note = "reset"
                cut_at = time.perf_counter()
                nursery.cancel_scope.cancel()
    except (trio.BrokenResourceError, OSError) as exc:
        note = f"{type(exc).__name__}: {exc}"
    finally:
        await trio.aclose_forcefully(stream)
    status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") and data[9:12].isdigit() else None
    results.append(LorisResult(kind, timeout, None if cut_at is None else cut_at - t0, status, note))


def loris_ok(r: LorisResult, slack: float) -> bool:
    """Cut at its timeout (not before, not after the slack), with 408 (head, body) or no answer (idle)."""
    expected_status = None if r.kind == "idle" else 408
    return (r.cut_after is not None and r.timeout - 0.1 <= r.cut_after <= r.timeout + slack
            and r.status == expected_status)


# ---------------------------------------------------------------------------------- the probe

def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response head")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.lower().split(b"\r\n")[1:]:
        if line.startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        body += data
    return int(head[9:12]), body


def probe_loop(port: int, token: str, interval: float, timeout: float, stop: threading.Event,
               out: list[tuple[float | None, str | None]]) -> None:
    """In a thread: every `interval` s a new connection + GET ?_attrs_=true; appends (latency s, error)."""
    raw = bl.request_bytes("GET", f"/api/predict/{SERVICE}?_attrs_=true", port, headers=bl.auth_headers(token))
    due = time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            with socket.create_connection((bl.LOCALHOST, port), timeout=timeout) as sock:
                sock.sendall(raw)
                status, body = _read_response(sock)
            latency = time.perf_counter() - t0
            out.append((latency, None) if status == 200 else (latency, f"status {status}: {body[:80]!r}"))
        except (OSError, ValueError) as exc:
            out.append((None, f"{type(exc).__name__}: {exc}"))
        due += interval
        stop.wait(max(0.0, due - time.perf_counter()))
