"""`qserve chaos`: kill -9 real servers again and again under load, then check that nothing was lost.

Strategy: producers (some puts with a priority, all with random tags), consumers in groups (manual
commits, negative commits, deliberate disconnects) and an admin task (deletes, now and then a
truncate) work on one queue through `qserve.client.QueueClient` (`workload`) while the main task,
once per round, SIGKILLs what serves it at a random moment and restarts it; the clients reconnect
by themselves. On the local backend that is one server on a data directory with small segments,
killed also mid-roll and mid-compaction, its log verified after every kill (`local`); on Redis
(``--backend URL``, or ``--kill-redis`` for a Redis chaos starts and kills too) it is one of
``--nodes`` qserve nodes, or the Redis primary (`nodes`). Every call and every delivery goes into a
`history.History`; at the end the workload stops, whatever is left is read with non-deleting gets,
the servers are stopped gracefully, and the checker counts lost, resurrected, duplicated, reordered
and corrupted entries (see `history` for the rules).

Output (`report`): a progress line per round on stderr, a summary table (or ``--json``) on stdout.
Exit status 0 when the checker found nothing (and a local log verified clean); 1 otherwise (the
data directory is then kept), also when the run itself failed (a server would not start, say):
that is one line on stderr, with the server's own last line; 2 for a usage error, and for a
``--backend`` that holds data without ``--flush`` (one line too). The seed is printed: it replays
the same kill schedule and choices (the interleaving with the servers still varies).

``--policies`` runs the servers with delivery policies (`workload.POLICY_OPTIONS`) and makes the
workload use them (poison entries, retried puts, delayed negative commits, a holder the lease
overrides); the final scan reads the dead-letter queue too and the checker knows the policies. On
Redis the nodes get the same flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import tempfile
from pathlib import Path

import trio

from qserve.config import ConfigError, check_backend_url

from .local import run_local
from .nodes import BackendError, Refused, run_nodes
from .redisd import RedisStartError, redis_server_missing
from .report import format_table, say
from .server import ServerStartError
from .workload import Settings

__all__ = ["add_arguments", "main", "run_chaos"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="kill/restart rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per round (default 2)")
    parser.add_argument("--producers", type=int, default=3, help="concurrent producers (default 3)")
    parser.add_argument("--consumers", type=int, default=4, help="watching consumers (default 4)")
    parser.add_argument("--groups", type=int, default=2, help="consumer groups they form (default 2)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--segment-bytes", type=int, default=64 * 1024,
                        help="the local server's segment size; small, so rolls and compactions are frequent "
                             "(default 65536)")
    parser.add_argument("--data-dir", type=Path,
                        help="fresh (empty or new) data directory (the local log, or --kill-redis's Redis); "
                             "default a temporary one")
    parser.add_argument("--port", type=int, default=0,
                        help="the server's loopback port; node i gets PORT+i-1 (default: free ones, picked "
                             "at the start)")
    parser.add_argument("--backend", metavar="URL",
                        help="run qserve nodes on this Redis (redis://, redis+cluster://, redis+sentinel://); "
                             "its database must be empty, see --flush")
    parser.add_argument("--nodes", type=int, help="qserve nodes on Redis (default 2)")
    parser.add_argument("--node-lease", type=float, default=2.0, metavar="SECONDS",
                        help="the nodes' --node-lease (default 2)")
    parser.add_argument("--flush", action="store_true", help="empty the --backend database first if it holds keys")
    parser.add_argument("--kill-redis", action="store_true",
                        help="start a Redis (append-only, fsync always) for the nodes and kill its primary too")
    parser.add_argument("--replica", action="store_true",
                        help="with --kill-redis: a primary, a replica and 3 Sentinels; the nodes use "
                             "redis+sentinel:// with --redis-wait 1")
    parser.add_argument("--policies", action="store_true",
                        help="run the servers with delivery policies (max deliveries 3, retry backoff, dedup "
                             "window, a 2 s lease) and exercise them: poison entries, retried puts, delayed "
                             "negative commits, a holder that never commits; the dead-letter queue is checked too")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory on success")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def _usage_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line, or None."""
    if not (args.rounds >= 1 and args.seconds > 0 and args.producers >= 1 and args.consumers >= 0
            and args.groups >= 1 and args.segment_bytes >= 1024):     # NaN fails too
        return ("--rounds, --seconds, --producers, --groups must be positive, --consumers >= 0, "
                "--segment-bytes >= 1024")
    on_redis = bool(args.backend) or args.kill_redis
    nodes = args.nodes if args.nodes is not None else (2 if on_redis else 1)
    if args.backend and args.kill_redis:
        return "--kill-redis starts a Redis of its own: give --backend or --kill-redis, not both"
    if args.replica and not args.kill_redis:
        return "--replica needs --kill-redis (chaos starts the primary, the replica and the Sentinels)"
    if args.flush and not args.backend:
        return "--flush empties the --backend database; it needs --backend"
    if args.backend and args.data_dir is not None:
        return "--data-dir is for the local log or --kill-redis's Redis; --backend needs none"
    if args.nodes is not None and not on_redis:
        return "--nodes needs --backend or --kill-redis (the local segment log has one owner)"
    if not 1 <= nodes <= 64:
        return f"--nodes {nodes} is not between 1 and 64"
    if not (math.isfinite(args.node_lease) and args.node_lease >= 0.1):
        return "--node-lease must be at least 0.1 seconds"
    if args.policies and args.consumers < 1:
        return "--policies needs --consumers >= 1 (poison entries reach the dead-letter queue through them)"
    if args.backend:
        try:
            check_backend_url(args.backend)
        except ConfigError as exc:
            return str(exc).replace("backend:", "--backend:", 1)
    if not 0 <= args.port <= 65535 - (nodes - 1):
        return f"--port {args.port} is not a port (0-65535; 0 picks free ones)" if nodes == 1 else \
            f"--port {args.port}: {nodes} nodes need ports {args.port}-{args.port + nodes - 1} (at most 65535)"
    return None


def main(args: argparse.Namespace) -> int:
    """Run ``qserve chaos``. Returns the exit status."""
    problem = _usage_error(args)
    if problem:
        say(problem)
        return 2
    if args.kill_redis and redis_server_missing():
        say(redis_server_missing())
        return 1
    for name in ("qserve.client", "coredis"):   # a refused or lost watch is the experiment, not news
        logging.getLogger(name).setLevel(logging.ERROR)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    own_dir = args.data_dir is None
    data_dir = None
    if not args.backend:           # a Redis the user runs needs no directory here
        try:
            data_dir = _fresh_data_dir(args.data_dir)
        except _Refused as exc:
            say(str(exc))
            return 2
    kept = f"; data kept in {data_dir}" if data_dir else ""
    on_redis = bool(args.backend) or args.kill_redis
    settings = Settings(args.rounds, args.seconds, args.producers, args.consumers, args.groups, seed,
                        args.segment_bytes, data_dir, args.port, backend=args.backend or "",
                        nodes=args.nodes or (2 if on_redis else 1), kill_redis=args.kill_redis,
                        replica=args.replica, flush=args.flush, node_lease=args.node_lease,
                        policies=args.policies)
    try:
        summary = trio.run(run_chaos, settings)
    except Refused as exc:
        say(str(exc))
        return 2
    except (Exception, KeyboardInterrupt) as exc:   # noqa: BLE001 - the CLI's last line of defence
        leaves = _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            say(f"interrupted{kept}")
            return 130
        say(f"failed: {'; '.join(map(_describe, leaves))}{kept}")
        return 1
    ok = summary["ok"]
    if data_dir and ok and not args.keep:
        if own_dir:                # a directory the user named stays
            shutil.rmtree(data_dir, ignore_errors=True)
    elif data_dir:
        summary["data_dir"] = str(data_dir)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print("\n".join(format_table(summary)))
    return 0 if ok else 1


async def run_chaos(settings: Settings) -> dict:
    """One run on the backend ``settings`` name; returns the summary (`report.summarize`)."""
    return await (run_nodes(settings) if settings.on_redis else run_local(settings))


class _Refused(Exception):
    """A usage error about the data directory; the message is one line."""


def _fresh_data_dir(path: Path | None) -> Path:
    """`path` checked to be a fresh (missing or empty) directory and created; without one, a new
    temporary directory."""
    try:
        if path is None:
            return Path(tempfile.mkdtemp(prefix="qserve-chaos-"))
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise _Refused(f"--data-dir {path} is not a fresh (empty) directory")
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as exc:
        where = exc.filename or path or tempfile.gettempdir()
        raise _Refused(f"cannot create the data directory {where}: {(exc.strerror or str(exc)).lower()}") from None


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _describe(exc: BaseException) -> str:
    """One line for an exception: a start failure is its own message, the rest get their type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, (ServerStartError, RedisStartError, BackendError)):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
