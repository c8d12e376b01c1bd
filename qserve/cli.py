"""The `qserve` command: `serve`, and `log`, `stream`, `worker`, `chaos`, `migrate`, `redis`,
`completion` from their modules.

Strategy: argparse only builds a dict of flags; `config.load_config` merges it with the file and
the environment; each other subcommand lives in its own module (``add_arguments(parser)`` and
``main(args) -> int``), imported by name only when it is the one chosen, so `qserve log` does not
pay for trio, `qserve serve` does not import the tools, and qserve never imports `qserve.tools`
statically.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

__all__ = ["main", "build_parser"]

# subcommand -> (module, description); each module provides add_arguments(parser) and main(args) -> int
EXTERNAL = {
    "log": ("qserve.tools.logtool.cli", "inspect, verify and repair queue logs on disk"),
    "stream": ("qserve.stream.cli", "the commands of `eascmd stream` against a queue"),
    "worker": ("qserve.worker.cli", "run an async-inference worker on a queue"),
    "chaos": ("qserve.tools.chaos.cli", "kill -9 crash-recovery testing against a real server"),
    "migrate": ("qserve.backends.redis.cli", "copy a data directory's queues into Redis and verify the copy"),
    "redis": ("qserve.backends.redis.cli", "inspect a queue kept in Redis (qserve redis inspect QUEUE)"),
    "completion": ("qserve.completion", "print a bash or zsh completion script for qserve"),
}


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the queue server",
                       description="Run the queue server. Every flag is also QSERVE_<FLAG> in the "
                                   "environment and a key in the --config TOML file.")
    p.add_argument("--config", help="TOML file with settings")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080; 0 = any free port)")
    p.add_argument("--processes", type=int, metavar="N",
                   help="server processes sharing the port (SO_REUSEPORT), kept by one supervisor that "
                        "restarts one that dies; needs --backend (default 1)")
    p.add_argument("--data-dir", help="where queues live with the local backend (default ./qserve-data; "
                                      "not used with --backend)")
    p.add_argument("--backend", metavar="URL",
                   help="redis://[user:password@]host:port[/db] or rediss://...; default: the local segment "
                        "log in --data-dir (a password is shown as ***; QSERVE_BACKEND keeps it out of ps)")
    p.add_argument("--redis-wait", type=int, metavar="N",
                   help="Redis: answer a write only once N replicas have it (WAIT; default 0)")
    p.add_argument("--redis-wait-timeout", type=float, metavar="SECONDS",
                   help="Redis: seconds --redis-wait may take before the write is answered 503 (default 1)")
    p.add_argument("--node-lease", type=float, metavar="SECONDS",
                   help="Redis: seconds after which a node that stopped renewing its lease is taken as dead "
                        "and its consumers' entries go back to their groups (default 10)")
    p.add_argument("--max-deliveries", type=int, metavar="N",
                   help="move an entry delivered N times to a group without a commit to the service's "
                        "dead-letter queue /api/predict/S/dlq (default 0: never)")
    p.add_argument("--retry-backoff", metavar="INITIAL,FACTOR,MAX",
                   help="a negative commit without _delay_ hides the entry for INITIAL*FACTOR^(n-1), at most "
                        "MAX, after its n-th delivery (e.g. 1s,2,1m; default: redeliver at once)")
    p.add_argument("--dedup-window", metavar="DURATION",
                   help="a put whose client-supplied requestId was stored in the queue within DURATION "
                        "answers the original index and stores nothing (e.g. 5m; default 0: off)")
    p.add_argument("--delivery-timeout", metavar="DURATION",
                   help="an entry a consumer holds this long without a commit goes back to its group "
                        "(lastCode=timeout; e.g. 30s; default 0: no limit)")
    p.add_argument("--token", help="token every request must carry in Authorization")
    p.add_argument("--insecure", action="store_const", const=True,
                   help="allow a non-loopback address without a token")
    p.add_argument("--fsync", choices=("always", "interval", "never"),
                   help="always: answer writes after fsync (group commit, default); "
                        "interval: fsync every --fsync-interval; never: leave it to the OS")
    p.add_argument("--fsync-interval", type=float, help="seconds between fsyncs with --fsync interval")
    p.add_argument("--fsync-backend", choices=("auto", "aio", "threads"),
                   help="how fsyncs run: aio (Linux kernel AIO), threads, or auto (aio where it works, "
                        "else threads; default)")
    p.add_argument("--no-fsync-poll", dest="fsync_poll", action="store_const", const=False,
                   help="an fsync the otherwise idle server waits for sleeps in the kernel instead of being "
                        "polled for on the AIO completion ring (less CPU, ~50 us more per fsync on a VM)")
    p.add_argument("--idle-poll-us", type=int,
                   help="before the otherwise idle server sleeps, it polls for arrivals up to this many "
                        "microseconds, adapting to how soon they came lately (default 1000; 0: never)")
    p.add_argument("--max-payload-bytes", type=int, help="largest entry accepted (default 524288)")
    p.add_argument("--max-length", type=int, help="entries a queue holds before puts get 429")
    p.add_argument("--trim-oldest", action="store_const", const=True,
                   help="when a queue is full, drop its oldest entries instead of refusing the put")
    p.add_argument("--segment-bytes", type=int, help="size at which a new segment file starts")
    p.add_argument("--queues", help="comma-separated services to serve (default: any, created on first use)")
    p.add_argument("--root-service", help="also serve this service at / and /sink")
    p.add_argument("--no-auto-create", dest="auto_create", action="store_const", const=False,
                   help="create no queue on first use: only --queues, --root-service, queues on disk and "
                        "POST /api/queues/SERVICE (qserve stream create) exist")
    p.add_argument("--max-queues", type=int, help="queues the server opens at most (default 1024; more get 507)")
    p.add_argument("--max-connections", type=int, help="open connections before new ones get 503")
    p.add_argument("--max-header-bytes", type=int, help="largest request head before a 431 (default 16384)")
    p.add_argument("--request-timeout", type=float,
                   help="seconds a started request may take to arrive in full before a 408 (default 30)")
    p.add_argument("--keepalive-timeout", type=float, help="seconds an idle connection is kept (default 60)")
    p.add_argument("--shutdown-timeout", type=float,
                   help="on SIGTERM or Ctrl-C, seconds in-flight requests get to finish before they are "
                        "cut (default 10); a second signal cuts them at once")
    p.add_argument("--worker", help="MODULE:FUNCTION (or demo): run an inference worker inside the server")
    p.add_argument("--worker-concurrency", type=int, help="entries the embedded worker handles at once (default 1)")
    p.add_argument("--log-level", help="DEBUG, INFO (default), WARNING")
    p.add_argument("--log-format", choices=("text", "json"),
                   help="text (default) or json: one JSON object a line (time, level, event, queue, ...)")
    p.add_argument("--access-log", action="store_const", const=True,
                   help="log one line per request: method, path, status, duration, bytes (never a header)")
    p.add_argument("--metrics-token",
                   help="a token GET /metrics takes besides --token (for Prometheus scrapers)")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `qserve` parser. Every subcommand is listed, but only ``command``'s module is imported
    to declare its flags (None: every module, for the completion scripts): `qserve serve` loads
    neither the tools nor the client, and a subcommand's module runs only when it is chosen."""
    parser = argparse.ArgumentParser(prog="qserve", description="A queue server for asynchronous inference, "
                                     "compatible with the PAI-EAS queue service clients.")
    parser.add_argument("--version", action="version", version=f"qserve {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    for name, (module, help_text) in EXTERNAL.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is None or command == name:
            importlib.import_module(module).add_arguments(p)
    return parser


def _command(argv: list[str]) -> str:
    """The subcommand named on the command line (its first word that is not an option), or ""."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def _serve(args: argparse.Namespace, argv: list[str]) -> int:
    import trio

    from qserve.config import ConfigError, load_config
    from qserve.server.logs import OneLine, configure_logging
    from qserve.server.server import run
    from qserve.server.startup import StartupError, listeners_for, prepare
    from qserve.server.supervisor import supervise, supervised_process

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    try:
        config = load_config(flags, config_file=args.config)
    except ConfigError as exc:
        print(f"qserve: {exc}", file=sys.stderr)
        return 2
    configure_logging(config)   # --log-format, --log-level, --access-log
    level = logging.getLogger().getEffectiveLevel()
    if level > logging.DEBUG:   # the Redis client logs each retried command at INFO: noise (a start
        # against an unreachable Redis would not be one line); the backend logs an outage itself
        logging.getLogger("coredis").setLevel(max(level, logging.WARNING))
        logging.getLogger("coredis").addFilter(OneLine())   # its errors as one line, none at a stop
    if config.processes > 1:   # a supervisor of N server processes sharing the port
        return supervise(config, argv)
    try:
        supervised = supervised_process(os.environ)   # a process of `--processes N` (shares the port), or None
        # the data directory's lock (local backend) and the bound sockets, or one line
        prepared = prepare(config, reuse_port=supervised is not None)
    except StartupError as exc:
        print(f"qserve: {exc}", file=sys.stderr)
        return 1
    try:
        if config.worker:
            from qserve.server.embedded import run_embedded
            return run_embedded(config, prepared.sockets)
        trio.run(lambda: run(config, listeners_for(prepared.sockets),
                             on_listening=None if supervised is None else supervised.listening))
        return 0
    except (StartupError, ConfigError, BaseExceptionGroup) as exc:   # a declared queue that cannot open, no AIO
        failed = exc.subgroup((StartupError, ConfigError)) if isinstance(exc, BaseExceptionGroup) else exc
        if failed is None:
            raise
        while isinstance(failed, BaseExceptionGroup):
            failed = failed.exceptions[0]
        print(f"qserve: {failed}", file=sys.stderr)
        return 1
    finally:
        prepared.close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from qserve import __version__
    try:
        return version("qserve")
    except PackageNotFoundError:   # running from a source tree that was not installed
        return __version__


EX_SOFTWARE = 70   # sysexits.h: an internal error (a bug), as opposed to a usage (2) or runtime (1) error


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Whatever escapes it is one line on stderr, never a traceback, unless
    the log level is DEBUG (`--log-level DEBUG` or QSERVE_LOG_LEVEL=DEBUG)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args, argv)
        return importlib.import_module(args._module).main(args)
    except KeyboardInterrupt:
        print(f"qserve {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:   # noqa: BLE001 - the last line of defence of a command-line program
        if _debug(args):
            traceback.print_exc()
        print(f"qserve {args.command}: unexpected error: {type(exc).__name__}: {_one_line(exc)}"
              " (--log-level DEBUG shows the traceback)", file=sys.stderr)
        return EX_SOFTWARE


def _debug(args: argparse.Namespace) -> bool:
    level = getattr(args, "log_level", None) or os.environ.get("QSERVE_LOG_LEVEL") or ""
    return str(level).upper() == "DEBUG"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or "(no message)"


if __name__ == "__main__":
    sys.exit(main())
