"""`qserve serve`: wire the queues, the API and the HTTP/WebSocket edge together and run them.

Strategy: one nursery owns everything (structured concurrency): the queue manager's flusher and
housekeeping tasks, the HTTP server, and the signal watcher. Shutdown (SIGINT/SIGTERM or
`Server.shutdown()`) stops accepting, lets in-flight requests finish, then cancels the queue tasks
and syncs and closes every log before `run()` returns.
"""

from __future__ import annotations

import gc
import logging
import signal

import trio

from .app import App
from .config import Config
from .http import HTTPConfig, HTTPServer
from .queues import QueueManager
from .watch import WatchService

__all__ = ["Server", "run", "http_config_for"]

log = logging.getLogger("qserve")


def http_config_for(config: Config) -> HTTPConfig:
    return HTTPConfig(
        max_header_bytes=config.max_header_bytes,
        max_body_bytes=config.max_payload_bytes,
        max_connections=config.max_connections,
        keepalive_timeout=config.keepalive_timeout,
        request_timeout=config.request_timeout,
    )


class Server:
    """A running qserve. Start it with `nursery.start(server.run)`; it reports the bound port."""

    def __init__(self, config: Config, listeners: list[trio.abc.Listener] | None = None, *,
                 fileio=None) -> None:
        self.config = config
        self._listeners = listeners   # default: TCP on config.host:config.port
        self._fileio = fileio         # storage.FileIO for every queue (tests inject disk faults)
        self.port: int | None = None
        self.app: App | None = None
        self.http: HTTPServer | None = None
        self.queues: QueueManager | None = None
        self._stop = trio.Event()

    def shutdown(self) -> None:
        self._stop.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        try:
            async with trio.open_nursery() as queue_tasks:
                self.queues = QueueManager(config, queue_tasks, fileio=self._fileio)
                await self.queues.open_declared()
                self.app = App(config, self.queues)
                self.app.watch = WatchService(self.app, self.queues)
                queue_tasks.start_soon(self.app.watch.fallback)   # stopped with the queue tasks
                self.http = HTTPServer(self.app.handle, self._ws_handler(), http_config_for(config))
                async with trio.open_nursery() as front:
                    if self._listeners is None:
                        self.port = await front.start(self.http.serve_tcp, config.host, config.port)
                    else:
                        await front.start(self.http.serve, self._listeners)
                    log.info("qserve listening on http://%s:%s (data in %s, fsync=%s%s)",
                             _host_for_url(config.host), self.port, config.data_dir, config.fsync,
                             "" if config.fsync == "never" else f" via {self.queues.fsync_mechanism}")
                    task_status.started(self.port)
                    await self._stop.wait()
                    log.info("shutting down: draining connections")
                    self.http.shutdown()
                # the front is drained; stop the queue tasks (a flusher finishes its fsync first)
                queue_tasks.cancel_scope.cancel()
        finally:
            if self.queues is not None:
                self.queues.close_all()
                log.info("stopped; all queues synced and closed")

    def _ws_handler(self):
        return self.app.watch.websocket


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run(config: Config) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    server = Server(config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, signals, server)
            async with trio.open_nursery() as serving:
                await serving.start(server.run)
                freeze_startup_heap()
            nursery.cancel_scope.cancel()


def freeze_startup_heap() -> int:
    """Move what is alive once the server listens (modules, classes, functions: ~30,000 objects)
    out of the cyclic collector's reach, so that every later full collection, a pause of the event
    loop, skips them (~13 ms less per full collection on the CI VM, where a loaded server's took
    60-85 ms). For the standalone process only: frozen objects are never collected, which a test
    process running many servers must not accumulate. Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def _stop_on_signal(signals, server: Server) -> None:
    async for signum in signals:
        log.info("received %s", signal.Signals(signum).name)
        server.shutdown()
        return
