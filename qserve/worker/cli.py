"""`qserve worker` and `qserve serve --worker`: the async-inference framework.

Strategy: this module is the thin outer layer (flags, signals, wiring); the engine is
`worker.engine.Worker` and the handler plumbing `worker.handler`. A worker watches a service's
input queue as consumer ``{service}.{hostname}-{pid}-{short uuid}`` (group = the service name),
calls ``handler(data: bytes, tags: dict[str, str])`` on each entry, puts the result into
``SERVICE/sink`` with the input's ``requestId`` and ``ts@source``, and only then commits the input.
SIGTERM or SIGINT drains it (see `worker.engine`); a second signal cuts the drain short.

`qserve serve --worker` is wired on the server side (`qserve.server.embedded`), which uses
`drain_on_signals` from here: this package never imports the server.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import urllib.parse
import uuid

import trio

from qserve.signals import numbered
from qserve.wire.names import MOUNT
from qserve.worker.engine import Worker
from qserve.worker.handler import Handler, HandlerSpecError, load_handler
from qserve.worker.probe import leaves

__all__ = ["add_arguments", "main", "service_of", "default_user", "input_url_problem", "serve_worker",
           "drain_on_signals", "allow_cwd_imports"]

log = logging.getLogger("qserve.worker")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_user() -> str:
    """The consumer's user id: ``{hostname}-{pid}-{8 hex}``, unique per process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def service_of(url: str) -> str:
    """The service name in a queue URL: what follows ``/api/predict/``; for a root-mounted URL
    (``http://host:port/``) the path itself, else ``default``. Used as the consumer group."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    if MOUNT in path:
        path = path.split(MOUNT, 1)[1]
    return path.strip("/") or "default"


def allow_cwd_imports() -> None:
    """Let `--handler mymodule:fn` find modules in the current directory, as `python -m` would."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


# ----------------------------------------------------------------------------------- running

async def drain_on_signals(signals, worker: Worker) -> None:
    async for received, sig in numbered(signals):
        if received == 1:
            log.info("received %s: draining (send it again to stop at once)", sig.name)
        else:
            log.warning("received %s again: cutting the drain short", sig.name)
        worker.drain(now=received > 1)


async def serve_worker(worker: Worker) -> None:
    """Run `worker` until SIGINT/SIGTERM has drained it."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_on_signals, signals, worker)
            await worker.run()
            nursery.cancel_scope.cancel()


async def _standalone(args: argparse.Namespace, handler: Handler) -> None:
    from qserve.client import QueueClient

    client = QueueClient(args.url, token=args.token, user=args.user or default_user(),
                         group=args.group or service_of(args.url), max_connections=max(4, args.concurrency))
    try:
        worker = Worker(client, handler, concurrency=args.concurrency, drain_seconds=args.drain_seconds,
                        summary_interval=args.summary_seconds)
        await serve_worker(worker)
    finally:
        with trio.CancelScope(shield=True):
            await client.aclose()


# --------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True,
                        help="the input queue: http://HOST:PORT/api/predict/SERVICE")
    parser.add_argument("--handler", required=True,
                        help="MODULE:FUNCTION called as fn(data: bytes, tags: dict) (sync or async), "
                             "or `demo` for the built-in toy model")
    parser.add_argument("--token", default=os.environ.get("QSERVE_TOKEN"),
                        help="the queue token (default: $QSERVE_TOKEN)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="entries processed at once; also the watch window (default 1)")
    parser.add_argument("--user", help="consumer user id (default: HOSTNAME-PID-RANDOM)")
    parser.add_argument("--group", help="consumer group (default: the service name)")
    parser.add_argument("--drain-seconds", type=float, default=30.0,
                        help="on SIGTERM, how long running handlers may take to finish (default 30)")
    parser.add_argument("--summary-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO), format=_LOG_FORMAT)
    if not (args.concurrency >= 1 and args.drain_seconds >= 0 and args.summary_seconds > 0):   # NaN too
        print("qserve worker: --concurrency must be >= 1 and --drain-seconds >= 0", file=sys.stderr)
        return 2
    for flag in ("token", "user", "group"):
        value = getattr(args, flag)
        if value is not None and not value.isprintable():
            print(f"qserve worker: --{flag} contains a control character (a trailing newline?)", file=sys.stderr)
            return 2
    from qserve.client import QueueError

    problem = input_url_problem(args.url)
    if problem:
        print(f"qserve worker: {problem}", file=sys.stderr)
        return 2
    allow_cwd_imports()
    try:
        handler = load_handler(args.handler)
    except HandlerSpecError as exc:
        print(f"qserve worker: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qserve worker: interrupted", file=sys.stderr)
        return 130
    try:
        trio.run(_standalone, args, handler)
    except (Exception, KeyboardInterrupt) as exc:   # noqa: BLE001 - the CLI's last line of defence
        failures = leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
        if any(isinstance(e, KeyboardInterrupt) for e in failures):
            print("qserve worker: interrupted", file=sys.stderr)
            return 130
        if all(isinstance(e, QueueError) for e in failures):
            # the first watch handshake was refused: bad token, unknown queue
            log.error("worker could not start: %s", "; ".join(map(str, failures)))
            return 1
        debug = log.isEnabledFor(logging.DEBUG)
        log.error("worker failed: %s%s", "; ".join(map(_describe, failures)),
                  "" if debug else " (--log-level DEBUG shows the traceback)", exc_info=exc if debug else None)
        return 1
    return 0


def input_url_problem(url: str) -> str | None:
    """What is wrong with `url` as a worker's ``--url`` (one line), or None if it names an input queue.

    Refused: anything `QueueURL.parse` refuses (no http(s) scheme, no host, a bad port, a query),
    port 0, a sink queue (``.../sink``: a worker reads a service's input queue and writes its sink)
    and ``/api/predict/`` with no service after it.
    """
    from qserve.client.http import QueueURL

    try:
        parsed = QueueURL.parse(url)
    except ValueError as exc:
        return str(exc)
    if parsed.port == 0:
        return f"bad URL {url!r}: port 0 names no server"
    path = parsed.path.rstrip("/")
    if path.endswith("/sink"):
        source = url.rstrip("/")[: -len("/sink")]
        if source.count("/") == 2:       # http://host:port: the root-mounted service
            source += "/"
        return (f"the worker watches a service's input queue; --url names a sink ({url}): "
                f"use {source}")
    if path.endswith("/api/predict"):
        return f"bad URL {url!r}: no service after /api/predict/"
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
