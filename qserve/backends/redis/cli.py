"""`qserve migrate` and `qserve redis inspect`: the command lines of `migrate` and `inspect`.

Strategy: one module for the two subcommands that work on a Redis deployment outside a server
(`qserve.cli` registers both under their names and calls ``add_arguments``/``main`` here, which
dispatch on the subcommand). Argument parsing stays cheap: trio, coredis and storage are imported
only when a command runs. Every failure is one line on stderr: a bad URL or queue name exits 2, as
a bad flag does; a refusal (`MigrateError`, `InspectError`) or a Redis failure
(`link.redis_error`'s one line) exits 1; anything else is a bug for `qserve.cli.main` to report.
The URL may come from ``QSERVE_BACKEND``, as for `qserve serve`, which keeps a password out of
``ps``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = ["add_arguments", "main"]

#: entries between two progress lines of `qserve migrate` (--progress)
PROGRESS_EVERY = 100_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``qserve migrate`` or ``qserve redis`` (named by the parser's last word)."""
    if parser.prog.split()[-1] == "migrate":
        _add_migrate(parser)
    else:
        _add_redis(parser)


def _url_flag(parser: argparse.ArgumentParser, flag: str) -> None:
    parser.add_argument(flag, dest="url", metavar="URL", default=os.environ.get("QSERVE_BACKEND"),
                        help="the Redis deployment, as qserve serve --backend takes it (default: $QSERVE_BACKEND, "
                             "which keeps a password out of ps)")


def _add_migrate(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Copy every queue of a local data directory (entries with their indexes, next index, "
                          "requestIds, ended state) into Redis, then read the copy back and compare. The data "
                          "directory is locked meanwhile (refused while a server uses it); its entries are not "
                          "changed. A queue that exists in Redis already is refused before anything is copied.")
    parser.add_argument("--from", dest="data_dir", metavar="DATA_DIR", required=True,
                        help="the data directory of a stopped local qserve serve")
    _url_flag(parser, "--to")
    parser.add_argument("--progress", type=int, default=PROGRESS_EVERY, metavar="N",
                        help=f"a progress line on stderr every N entries copied or verified (default "
                             f"{PROGRESS_EVERY}; 0: none)")


def _add_redis(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="redis_command", required=True)
    p = sub.add_parser("inspect", help="show one queue's keys, state, groups and consumers in Redis",
                       description="Show one queue's keys (names, types, lengths), state, next index, first and "
                                   "last live index, groups and consumers (node, window, held entries, lease).")
    p.add_argument("queue", metavar="QUEUE", help="SERVICE (its input queue), SERVICE/sink or SERVICE/dlq")
    _url_flag(p, "--backend")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")


def main(args: argparse.Namespace) -> int:
    command = "redis inspect" if args.command == "redis" else "migrate"
    flag = "--backend" if args.command == "redis" else "--to"
    if not args.url:
        return _fail(command, f"{flag} URL (or QSERVE_BACKEND) names the Redis deployment", 2)
    from qserve.backends.redis.url import parse_redis_url
    from qserve.config import ConfigError
    try:
        target = parse_redis_url(args.url)
    except ConfigError as exc:   # its message names the setting: "backend: ..."
        return _fail(command, f"{flag}{str(exc).removeprefix('backend')}", 2)
    import trio

    from qserve.backends.redis.link import redis_error
    if args.command == "migrate":
        from qserve.backends.redis.migrate import MigrateError as Refused
        run, what = _migrate, Path(args.data_dir)
    else:
        from qserve.backends.redis.inspect import InspectError as Refused
        from qserve.backends.redis.inspect import parse_queue
        try:
            run, what = _inspect, parse_queue(args.queue)
        except Refused as exc:
            return _fail(command, str(exc), 2)
    try:
        return trio.run(run, args, what, target)
    except BaseException as exc:
        leaf = _leaf(exc)
        if isinstance(leaf, Refused):
            return _fail(command, str(leaf), 1)
        err = redis_error(leaf, target.where) if isinstance(leaf, Exception) else None
        if err is None:
            raise leaf from None
        return _fail(command, err.reason, 1)


async def _migrate(args: argparse.Namespace, data_dir: Path, target) -> int:
    from qserve.backends.redis.migrate import migrate

    def progress(line: str) -> None:
        print(f"qserve migrate: {line}", file=sys.stderr, flush=True)

    reports = await migrate(data_dir, target, say=lambda line: print(line, flush=True), progress=progress,
                            every=max(0, args.progress))
    queues = "1 queue" if len(reports) == 1 else f"{len(reports)} queues"
    entries = sum(r.entries for r in reports)
    entries_text = "1 entry" if entries == 1 else f"{entries} entries"
    print(f"migrated {queues}, {entries_text}, from {data_dir} to redis at {target.where}: verified")
    return 0


async def _inspect(args: argparse.Namespace, ref, target) -> int:
    from qserve.backends.redis.inspect import inspect
    from qserve.backends.redis.link import Link

    link = Link(target, "inspect")
    async with link.connected():
        report = await inspect(link, ref)
    print(report.to_json() if args.json else "\n".join(report.to_text()))
    return 0


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) groups of one, as coredis's task group raises it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _fail(command: str, reason: str, status: int) -> int:
    print(f"qserve {command}: {reason}", file=sys.stderr)
    return status
