"""`qserve serve`: wire the queues, the API and the HTTP/WebSocket edge together and run them.

Strategy: one nursery owns everything (structured concurrency): the queue manager's flusher and
housekeeping tasks, the HTTP server, and (in `run`) the signal watcher. A run has three stages:

    starting    open the queues the user named (one that cannot open is a `StartupError`, raised
                before anything listens), then the others on disk; `shutdown()` here stops opening
    serving     listen, log "qserve listening on ...", answer requests until `shutdown()`
    draining    log ONE line "draining N connections (up to S s)"; stop accepting, answer the
                long-polling gets (204), end the watches (WebSocket close 1001), close idle
                keep-alive connections, let in-flight requests finish; after S seconds
                (``shutdown_timeout``) cut what is left; `abort()` cuts at once

and then, always, the queue tasks stop (a flusher finishes its fsync first) and every open log is
synced and closed. "stopped; all queues synced and closed" is logged only after a real start.

Signals (`run`): the first SIGINT/SIGTERM drains (exit status 0: the server did what it was told,
completely); a second one cuts the drain short and the process exits with 128 + the signal's
number (130 for SIGINT, 143 for SIGTERM), the shell's convention for "ended by that signal", so a
supervisor or script can tell a cut shutdown from a clean one. The logs are closed either way. The
watcher keeps consuming signals until the end, so none is left for trio to re-deliver as a
KeyboardInterrupt traceback.
"""

from __future__ import annotations

import gc
import logging
import signal
import time
from collections.abc import Callable

import trio

from qserve.server.app import App
from qserve.config import Config
from qserve.core.errors import QServeError
from qserve.core.events import QueueRef
from qserve.server.health import reporting_progress
from qserve.server.http import HTTPConfig, HTTPServer
from qserve.server.meters import Meters
from qserve.backends.base import Backend
from qserve.backends.faults import Faults
from qserve.backends.local.manager import QueueManager
from qserve.backends.redis.manager import RedisBackend
from qserve.server.startup import StartupError
from qserve.server.watch import WatchService
from qserve.signals import numbered

__all__ = ["Server", "run", "http_config_for", "freeze_startup_heap"]

log = logging.getLogger("qserve")

RECOVER_RETRY = (0.5, 10.0)   # seconds between attempts to open the stored queues at start: first, most


def http_config_for(config: Config) -> HTTPConfig:
    return HTTPConfig(
        max_header_bytes=config.max_header_bytes,
        max_body_bytes=config.max_payload_bytes,
        max_connections=config.max_connections,
        keepalive_timeout=config.keepalive_timeout,
        request_timeout=config.request_timeout,
        shutdown_grace=config.shutdown_timeout,
        idle_poll=config.idle_poll_us / 1e6,
    )


class Server:
    """A running qserve. Start it with `nursery.start(server.run)`; it reports the bound port.

    `shutdown()` and `abort()` may be called from any task of the same trio run.

    Args:
        config: the settings.
        listeners: already listening (the CLI binds its sockets before start, so that a busy port
            is a one-line error); default: TCP on ``config.host:config.port``.
        fileio: the `storage.FileIO` of every queue (tests inject disk faults).
        wall_clock: unix seconds for the entries' timestamps and ``ts@source`` / ``ts@sink`` tags
            (default `time.time`; a test fixes it).
    """

    def __init__(self, config: Config, listeners: list[trio.abc.Listener] | None = None, *,
                 fileio=None, wall_clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self._wall_clock = wall_clock
        self._listeners = listeners
        self._fileio = fileio
        self.port: int | None = None
        self.app: App | None = None
        self.meters = Meters(wall_clock)   # what `/metrics` reports: counted by the app and the watch
        self.watch = WatchService(config.request_timeout, self.meters)   # created first: every queue opened wakes it
        self.http: HTTPServer | None = None
        self.queues: Backend | None = None
        self._stop = trio.Event()
        self._starting = trio.CancelScope()   # cancelled by shutdown()/abort() while starting
        self._served = False                  # it listened: the "stopped" line is true
        self.recovered = trio.Event()         # every queue in the store is open (`_recover`)
        self._aborted = False

    def shutdown(self) -> None:
        """Drain and stop (see the module docstring); before the server listens, stop starting."""
        self._stop.set()
        self._starting.cancel()   # no effect once started

    def abort(self) -> None:
        """Stop at once: cut every connection now; the logs are still synced and closed."""
        self._aborted = True
        self.shutdown()
        self.watch.abort()
        if self.http is not None:
            self.http.abort()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start, serve until `shutdown()`, drain, close. ``task_status.started(port)`` once listening
        (port is None for listeners that are not TCP sockets). Returns without starting when
        `shutdown()` came first.

        Raises:
            StartupError: a queue named by ``queues`` or ``root_service`` cannot be opened; nothing
                listened.
        """
        failure: StartupError | None = None
        try:
            async with trio.open_nursery() as queue_tasks:
                with self._starting:
                    try:
                        began = trio.current_time()
                        self.queues = await self._open_backend(queue_tasks)
                        await self._open_required()
                    except StartupError as exc:
                        failure = exc   # raised outside the nursery: one plain error, no group
                if failure is None and not self._starting.cancelled_caught:
                    queue_tasks.start_soon(self._recover, queue_tasks, began)
                    await self._serve(queue_tasks, task_status)
                # the front is drained; stop the queue tasks (a flusher finishes its fsync first)
                queue_tasks.cancel_scope.cancel()
            if failure is not None:
                raise failure
        finally:
            if self.queues is not None:
                self.queues.close_all()
                if self._served:
                    log.info("stopped; all queues synced and closed")
                elif failure is None:
                    log.info("stopped before listening; the queues opened so far are synced and closed")

    async def _open_backend(self, queue_tasks: trio.Nursery) -> Backend:
        """The queues' backend: the segment log in ``data_dir``, or Redis with ``--backend``."""
        if not self.config.backend:
            return QueueManager(self.config, queue_tasks, fileio=self._fileio, on_change=self.watch.wake,
                                wall_clock=self._wall_clock)
        try:
            backend = RedisBackend(self.config, queue_tasks, on_change=self.watch.wake, on_evict=self.watch.evict,
                                   wall_clock=self._wall_clock)
            await backend.start()
        except QServeError as exc:
            raise StartupError(exc.reason) from None
        return backend

    async def _open_required(self) -> None:
        """The queues the user named must open, or the server does not start (before it listens)."""
        assert self.queues is not None
        for ref in self._demanded():
            try:
                await self.queues.open_required(ref)
            except QServeError as exc:
                raise StartupError(exc.reason) from None

    async def _recover(self, queue_tasks: trio.Nursery, began: float) -> None:
        """Once listening: open every other queue the store holds, so that each one's recovery report
        (or its fence) is logged at start; until this is done `/readyz` answers 503 and a listing waits,
        while a request to a queue opens (recovers) that one at once."""
        assert self.queues is not None
        with reporting_progress(queue_tasks, self._opened):
            await self._open_declared()
        await self._record_start(trio.current_time() - began)
        self.recovered.set()

    async def _open_declared(self) -> None:
        """`Backend.open_declared`, again after a backoff until it succeeds: a Redis that went away
        just after the start (or a registry it cannot read) leaves the node serving the queues it
        is asked for, not ready (503 on `/readyz`) until then. Said once per distinct reason."""
        assert self.queues is not None
        delay, faults = RECOVER_RETRY[0], Faults(log)
        while True:
            try:
                return await self.queues.open_declared()
            except Exception as exc:   # noqa: BLE001 - retried; the reason is logged once
                reason = exc.reason if isinstance(exc, QServeError) else f"{type(exc).__name__}: {exc}"
                faults.failed("open_declared", f"cannot open the stored queues yet ({reason[:300]}); "
                                               "not ready until then, retrying",
                              level=logging.WARNING if isinstance(exc, QServeError) else logging.ERROR, exc=exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RECOVER_RETRY[1])

    def _opened(self) -> int:
        """Queues opened so far (for the start-up's progress lines)."""
        return 0 if self.queues is None else len(self.queues.statistics())

    async def _record_start(self, seconds: float) -> None:
        """For `/metrics`: how long the start-up took to open every queue, and the entries in them."""
        assert self.queues is not None
        try:
            found: int | None = sum(status.length for status in await self.queues.listing())
        except QServeError:   # Redis went away meanwhile: the figure stays unknown
            found = None
        self.meters.started(seconds, found)

    def _demanded(self) -> list[QueueRef]:
        services = list(self.config.queues)
        if self.config.root_service and self.config.root_service not in services:
            services.append(self.config.root_service)
        return [QueueRef(service, sink=sink) for service in services for sink in (False, True)]

    async def _serve(self, queue_tasks: trio.Nursery, task_status) -> None:
        config = self.config
        assert self.queues is not None
        self.app = App(config, self.queues, self.watch, self.meters, wall_clock=self._wall_clock,
                       recovered=self.recovered,
                       edge_statistics=lambda: self.http.statistics() if self.http is not None else {})
        queue_tasks.start_soon(self.watch.fallback)   # stopped with the queue tasks
        self.http = HTTPServer(self.app.handle, self.app.websocket, http_config_for(config))
        if isinstance(self.queues, QueueManager):
            http = self.http
            self.queues.clients = lambda: http.open_connections
        async with trio.open_nursery() as front:
            if self._listeners is None:
                self.port = await front.start(self.http.serve_tcp, config.host, config.port)
            else:
                await front.start(self.http.serve, self._listeners)
                self.port = _bound_port(self._listeners)
            self._served = True
            if isinstance(self.queues, RedisBackend):
                log.info("qserve listening on http://%s:%s (queues in redis at %s, node %s)",
                         _host_for_url(config.host), self.port, self.queues.where, self.queues.node)
            else:
                log.info("qserve listening on http://%s:%s (data in %s, fsync=%s%s)",
                         _host_for_url(config.host), self.port, config.data_dir, config.fsync,
                         "" if config.fsync == "never" else f" via {self.queues.fsync_mechanism}")
            task_status.started(self.port)
            await self._stop.wait()
            if not self._aborted:
                n = self.http.open_connections
                log.info("draining %d connection%s (up to %g s)", n, "" if n == 1 else "s",
                         config.shutdown_timeout)
            self.app.shutdown()                                  # long-polls answer now
            self.watch.shutdown(config.shutdown_timeout)     # a batch in hand goes out first
            self.http.shutdown()   # returns at once; `serve` drains and returns, ending `front`


def _bound_port(listeners: list[trio.abc.Listener]) -> int | None:
    """The port of the first listener that is a TCP socket (what the CLI bound, maybe port 0)."""
    for listener in listeners:
        sock = getattr(listener, "socket", None)
        if sock is not None:
            try:
                return int(sock.getsockname()[1])
            except (OSError, IndexError, TypeError, ValueError):
                continue
    return None


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run(config: Config, listeners: list[trio.abc.Listener] | None = None, *,
              on_listening: Callable[[], None] | None = None) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully (a second signal: at once).

    Args:
        config: the settings.
        listeners: already bound (the CLI binds them before start, so that a busy port is a
            one-line error); default: bind here.
        on_listening: called once the server listens (a process of `--processes N` tells its
            supervisor).

    Raises:
        StartupError: a named queue cannot be opened (plain, not in an exception group).
        SystemExit: 128 + the signal's number when a second signal cut the drain short.
    """
    server = Server(config, listeners)
    signals_seen = _SignalWatcher(server)
    failure: StartupError | None = None
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals_seen.watch, signals)
            try:
                await server.run(task_status=_FreezeOnStart(on_listening))
            except StartupError as exc:
                failure = exc
            nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if signals_seen.forced is not None:
        raise SystemExit(128 + signals_seen.forced)


class _FreezeOnStart:
    """The ``task_status`` `run` gives `Server.run`: once it listens, freeze the start-up heap,
    then call ``then`` (if any)."""

    def __init__(self, then: Callable[[], None] | None = None) -> None:
        self._then = then

    def started(self, value=None) -> None:
        freeze_startup_heap()
        if self._then is not None:
            self._then()


class _SignalWatcher:
    """The first SIGINT/SIGTERM drains the server, the second cuts it short (``forced`` = its
    number); later ones are consumed and ignored (the process is already stopping at once)."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self.forced: int | None = None

    async def watch(self, signals) -> None:
        async for received, sig in numbered(signals):
            if received == 1:
                log.info("received %s: shutting down (send it again to stop at once)", sig.name)
                self._server.shutdown()
            elif received == 2:
                log.warning("received %s again: stopping at once", sig.name)
                self.forced = int(sig)
                self._server.abort()


def freeze_startup_heap() -> int:
    """Move what is alive once the server listens (modules, classes, functions) out of the cyclic
    collector's reach, so that every later full collection, a pause of the event loop, skips them
    (README, "Development", has the figures). For the standalone process only: frozen objects are
    never collected, which a test process running many servers must not accumulate. Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
