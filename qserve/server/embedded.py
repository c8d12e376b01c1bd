"""`qserve serve --worker MODULE:FUNCTION`: the server and one inference worker in a single trio run.

The worker talks to this process's own listener over loopback with the ordinary `QueueClient`
(so it behaves exactly like a separate `qserve worker`); a signal drains the worker before the
server shuts down. The wiring lives here, on the server side: the worker package never imports
the server.
"""

from __future__ import annotations

import logging
import signal
import sys
import urllib.parse

import trio

from qserve.client import QueueClient
from qserve.config import ConfigError
from qserve.server.server import Server
from qserve.server.startup import listeners_for
from qserve.wire.names import MOUNT
from qserve.worker.cli import allow_cwd_imports, default_user, drain_on_signals
from qserve.worker.engine import Worker
from qserve.worker.handler import Handler, HandlerSpecError, load_handler

__all__ = ["embedded_service", "run_embedded"]

log = logging.getLogger("qserve.worker")   # the embedded worker logs as the worker does


def embedded_service(config) -> str:
    """The service `qserve serve --worker` works on: ``--root-service``, else the one service in
    ``--queues``, else ``default``.

    Raises:
        ConfigError: several queues are declared and no root service picks one.
    """
    if config.root_service:
        return config.root_service
    if len(config.queues) == 1:
        return config.queues[0]
    if not config.queues:
        return "default"
    raise ConfigError("worker: --queues declares several services; name the worker's with --root-service")


def _loopback_host(host: str) -> str:
    """Where this process reaches its own listener on `host`, formatted for a URL."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


async def _embedded(config, service: str, handler: Handler, sockets=None) -> None:
    server = Server(config, None if sockets is None else listeners_for(sockets))
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.run)
            url = f"http://{_loopback_host(config.host)}:{port}{MOUNT}{urllib.parse.quote(service)}"
            log.info("embedded worker: handler %s on %s", handler.name, url)
            client = QueueClient(url, token=config.token_for(service), user=default_user(), group=service,
                                 max_connections=max(4, config.worker_concurrency))
            try:
                async with trio.open_nursery() as inner:
                    worker = Worker(client, handler, concurrency=config.worker_concurrency)
                    inner.start_soon(drain_on_signals, signals, worker)
                    await worker.run()
                    inner.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                server.shutdown()


def run_embedded(config, sockets=None) -> int:
    """`qserve serve --worker MODULE:FUNCTION`: the server and one worker (`--worker-concurrency`
    entries at once) in one process, on ``sockets`` (bound by `startup.bind_sockets`; default: bind
    here). Returns the exit status (2 for a bad handler or an ambiguous service)."""
    allow_cwd_imports()
    try:
        service = embedded_service(config)
        handler = load_handler(config.worker)
    except (ConfigError, HandlerSpecError) as exc:
        print(f"qserve: {exc}", file=sys.stderr)
        return 2
    trio.run(_embedded, config, service, handler, sockets)
    return 0
