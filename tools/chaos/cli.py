"""`qserve chaos`: kill -9 a real server again and again under load, then check that nothing was lost.

Strategy: a `qserve serve` child (`chaos.server`) runs on a fresh data directory with small segments
(64 KiB), so segment rolls and compactions happen all the time. Producers (some puts with a priority,
all with random tags), consumers in groups (manual commits, negative commits, deliberate
disconnects) and an admin task (deletes, now and then a truncate) work on one queue through
`qserve.client.QueueClient` while the main task, once per round, SIGKILLs the server at a random
moment (a random time, or right when a segment file appears or disappears: a roll or a compaction),
runs the log verifier on the dead server's directory (a torn tail is allowed there), and restarts it
on the same directory and port; the clients reconnect by themselves. Every call and every delivery
goes into a `chaos.history.History`; at the end the workload stops, whatever is left is read with
non-deleting gets, the server is stopped gracefully, the log must verify clean, and the checker
counts lost, resurrected, duplicated and corrupted entries (see `chaos.history` for the rules).

Output: a progress line per round on stderr, a summary table (or ``--json``) on stdout. Exit status
0 when nothing was lost, resurrected, duplicated, reordered or corrupted and the log verified clean;
1 otherwise (the data directory is then kept), also when the run itself failed (the server would
not start, say): that is one line on stderr, with the server's own last line; 2 for a usage error
(one line too). The seed is printed: it replays the same kill schedule and choices (the
interleaving with the server still varies).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio

from qserve.client import QueueClient, QueueError

from .history import History, Report, payload_for
from .server import ChaosServer, ServerStartError, free_port, segment_files, verify_data_dir

__all__ = ["add_arguments", "main", "Settings", "run_chaos"]

SERVICE = "chaos"
TOKEN = "chaos-token"
_TAG_VALUES = ("a", "b", "c")


@dataclass
class Settings:
    rounds: int = 5
    seconds: float = 2.0
    producers: int = 3
    consumers: int = 4
    groups: int = 2
    seed: int = 0
    segment_bytes: int = 64 * 1024
    data_dir: Path | None = None
    port: int = 0                 # 0: a free loopback port picked at the start


@dataclass
class Counters:
    kill_kinds: dict[str, int] = field(default_factory=lambda: {"timer": 0, "roll": 0, "compaction": 0})
    disconnects: int = 0
    torn_tails: int = 0
    restart_seconds: float = 0.0
    verify_problems: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rounds", type=int, default=5, help="kill/restart rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per round (default 2)")
    parser.add_argument("--producers", type=int, default=3, help="concurrent producers (default 3)")
    parser.add_argument("--consumers", type=int, default=4, help="watching consumers (default 4)")
    parser.add_argument("--groups", type=int, default=2, help="consumer groups they form (default 2)")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--segment-bytes", type=int, default=64 * 1024,
                        help="the server's segment size; small, so rolls and compactions are frequent "
                             "(default 65536)")
    parser.add_argument("--data-dir", type=Path,
                        help="fresh (empty or new) data directory; default a temporary one")
    parser.add_argument("--port", type=int, default=0,
                        help="the server's loopback port (default: a free one, picked at the start)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory on success")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def main(args: argparse.Namespace) -> int:
    """Run ``qserve chaos``. Returns the exit status."""
    if not (args.rounds >= 1 and args.seconds > 0 and args.producers >= 1 and args.consumers >= 0
            and args.groups >= 1 and args.segment_bytes >= 1024):     # NaN fails too
        print("qserve chaos: --rounds, --seconds, --producers, --groups must be positive, "
              "--consumers >= 0, --segment-bytes >= 1024", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"qserve chaos: --port {args.port} is not a port (0-65535; 0 picks a free one)", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**9)
    own_dir = args.data_dir is None
    try:
        data_dir = _fresh_data_dir(args.data_dir)
    except _Refused as exc:
        print(f"qserve chaos: {exc}", file=sys.stderr)
        return 2
    settings = Settings(args.rounds, args.seconds, args.producers, args.consumers, args.groups, seed,
                        args.segment_bytes, data_dir, args.port)
    try:
        summary = trio.run(run_chaos, settings)
    except (Exception, KeyboardInterrupt) as exc:   # noqa: BLE001 - the CLI's last line of defence
        leaves = _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
        if any(isinstance(e, KeyboardInterrupt) for e in leaves):
            _say(f"interrupted; data kept in {data_dir}")
            return 130
        _say(f"failed: {'; '.join(map(_describe, leaves))}; data kept in {data_dir}")
        return 1
    ok = summary["ok"]
    if own_dir and ok and not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    else:
        summary["data_dir"] = str(data_dir)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print("\n".join(format_table(summary)))
    return 0 if ok else 1


def _say(text: str) -> None:
    print(f"qserve chaos: {text}", file=sys.stderr, flush=True)


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
    """One line for an exception: a server start failure is its own message, the rest get their type."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, ServerStartError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def run_chaos(settings: Settings) -> dict:
    """The whole run in one trio loop; returns the summary (see `summarize`)."""
    history = History()
    counters = Counters()
    server = ChaosServer(settings.data_dir, port=settings.port or free_port(), token=TOKEN,
                         segment_bytes=settings.segment_bytes)
    rng = random.Random(settings.seed)
    url = f"{server.url}/api/predict/{SERVICE}"
    began = time.monotonic()
    await server.start()
    _say(f"seed {settings.seed}: {settings.rounds} rounds x {settings.seconds:g}s, "
         f"{settings.producers} producers, {settings.consumers} consumers in {settings.groups} groups, "
         f"server on port {server.port}, data in {settings.data_dir}")
    try:
        workload = _Workload(url, history, counters, settings, rng)
        async with trio.open_nursery() as workers:
            workload.start(workers)
            await _rounds(server, settings, history, counters, rng)
            workers.cancel_scope.cancel()
        await _drain(url, history)
    finally:
        status = await server.stop()
    if status not in (0, None):
        counters.verify_problems.append(f"graceful stop exited with status {status}:\n{server.log_tail(15)}")
    problems, _ = await trio.to_thread.run_sync(lambda: verify_data_dir(settings.data_dir, allow_torn_tail=False))
    counters.verify_problems += [f"after the final stop: {p}" for p in problems]
    return summarize(history.check(), counters, server, settings, time.monotonic() - began)


async def _rounds(server: ChaosServer, settings: Settings, history: History, counters: Counters,
                  rng: random.Random) -> None:
    for number in range(1, settings.rounds + 1):
        t0 = trio.current_time()
        end = t0 + settings.seconds
        kind = "timer"
        if rng.random() < 1 / 3:       # kill at the first roll or compaction after a short while
            await trio.sleep_until(t0 + 0.1 * settings.seconds)
            before = segment_files(settings.data_dir)
            while trio.current_time() < end - 0.05 * settings.seconds:
                await trio.sleep(0.002)
                now = segment_files(settings.data_dir)
                if now != before:
                    kind = "roll" if now - before else "compaction"
                    break
        else:
            await trio.sleep_until(t0 + rng.uniform(0.1, 0.9) * settings.seconds)
        killed_at = trio.current_time() - t0
        server.kill()
        history.tick()
        counters.kill_kinds[kind] += 1
        problems, torn = await trio.to_thread.run_sync(
            lambda: verify_data_dir(settings.data_dir, allow_torn_tail=True))
        counters.torn_tails += torn
        counters.verify_problems += [f"after kill {number}: {p}" for p in problems]
        took = await server.start()
        counters.restart_seconds += took
        _say(f"round {number}/{settings.rounds}: killed at {killed_at:.2f}s ({kind}), restarted in {took:.2f}s; "
             f"{sum(p.ack is not None for p in history.puts.values())} puts acknowledged, "
             f"{len(history.seen)} deliveries so far" + (f"; {len(problems)} VERIFY PROBLEMS" if problems else ""))
        await trio.sleep_until(max(end, trio.current_time()))


class _Workload:
    """Producers, consumers and the admin task; every call and delivery is recorded in ``history``."""

    def __init__(self, url: str, history: History, counters: Counters, settings: Settings,
                 rng: random.Random) -> None:
        self.url = url
        self.history = history
        self.counters = counters
        self.settings = settings
        self.seed = rng.randrange(2**32)
        self.recent: list[int] = []         # recently acknowledged indexes, for deletes and truncates

    def start(self, nursery: trio.Nursery) -> None:
        for p in range(self.settings.producers):
            nursery.start_soon(self.producer, p)
        for c in range(self.settings.consumers):
            nursery.start_soon(self.consumer, c)
        nursery.start_soon(self.admin)

    def _client(self, **kw) -> QueueClient:
        return QueueClient(self.url, token=TOKEN, timeout=3.0, retries=0, **kw)

    async def producer(self, p: int) -> None:
        rng = random.Random(f"{self.seed}-p{p}")
        history = self.history
        async with self._client(max_connections=1) as q:
            for n in range(1, 2**62):
                put_id = f"p{p}-{n}"
                tags = {"kind": rng.choice(_TAG_VALUES), "producer": str(p)}
                if rng.random() < 0.5:
                    tags["requestId"] = put_id
                priority = rng.choice((1, 2, 3)) if rng.random() < 0.2 else 0
                history.put_started(put_id, p, tags, priority)
                try:
                    index, request_id = await q.put(payload_for(put_id), tags, priority=priority)
                except QueueError:         # unknown: it may or may not be stored
                    await trio.sleep(rng.uniform(0.02, 0.1))
                    continue
                history.put_acked(put_id, index)
                if "requestId" in tags and request_id != put_id:
                    history.anomaly(f"put {put_id} answered with request id {request_id!r}")
                self.recent.append(index)
                del self.recent[:-200]
                await trio.sleep(rng.uniform(0, 0.004))

    async def consumer(self, c: int) -> None:
        rng = random.Random(f"{self.seed}-c{c}")
        group = f"g{c % self.settings.groups}"
        history = self.history
        async with self._client(user=f"c{c}", group=group) as q:
            conn = _track_connections(q, history)
            while True:
                held = 0
                async with q.watch(window=rng.randint(1, 8), reconnect_delay=0.05, ping_interval=1.0) as w:
                    while True:
                        entry = None
                        with trio.move_on_after(0.5):
                            entry = await w.__anext__()
                        if entry is None:
                            if held:
                                break            # the window may be full of held entries: let them go
                            continue
                        history.delivered(entry.index, entry.data, entry.tags, conn_start=conn[0], group=group)
                        action = rng.random()
                        if action < 0.8:
                            await self._remove(q, "commit", (entry.index,))
                        elif action < 0.9:
                            try:
                                await q.negative(entry.index, "500", "chaos")
                                history.negative_acked()
                            except QueueError:
                                pass
                        else:
                            held += 1            # neither: it goes back at the disconnect
                        if rng.random() < 0.03:
                            break                # a deliberate disconnect
                self.counters.disconnects += 1
                await trio.sleep(rng.uniform(0, 0.1))

    async def _remove(self, q: QueueClient, kind: str, indexes: tuple[int, ...] = (), below: int = 0) -> None:
        op = self.history.removal_started(kind, indexes, below)
        try:
            if kind == "commit":
                await q.commit(indexes)
            elif kind == "delete":
                await q.delete(indexes)
            else:
                await q.truncate(below)
        except QueueError:
            return                                # unknown: it may or may not have happened
        self.history.removal_acked(op)

    async def admin(self) -> None:
        rng = random.Random(f"{self.seed}-admin")
        async with self._client() as q:
            while True:
                await trio.sleep(rng.uniform(0.05, 0.3))
                if len(self.recent) < 20:
                    continue
                if rng.random() < 0.04:
                    below = sorted(self.recent)[len(self.recent) // 4]
                    await self._remove(q, "truncate", below=below)
                else:
                    picks = tuple(sorted(set(rng.sample(self.recent, rng.randint(1, 3)))))
                    await self._remove(q, "delete", picks)


def _track_connections(q: QueueClient, history: History) -> list[int]:
    """Make ``q``'s watch record, in the returned one-item list, the tick taken just before the
    handshake of its current connection (the checker's proof that a frame was sent after a commit)."""
    conn = [0]
    opener = q._open_websocket

    def open_websocket(resource: str):
        @asynccontextmanager
        async def tracked():
            started = history.tick()
            async with opener(resource) as ws:
                conn[0] = started
                yield ws
        return tracked()

    q._open_websocket = open_websocket
    return conn


async def _drain(url: str, history: History) -> None:
    """Record every entry still in the queue (non-deleting gets, pending entries included)."""
    async with QueueClient(url, token=TOKEN, timeout=10.0, retries=5) as q:
        start = 0
        while True:
            entries = await q.get(index=start, length=500, auto_delete=False)
            if not entries:
                return
            for e in entries:
                history.remaining(e.index, e.data, e.tags)
            start = entries[-1].index + 1


def summarize(rep: Report, counters: Counters, server: ChaosServer, settings: Settings, seconds: float) -> dict:
    verify = "clean" if not counters.verify_problems else f"{len(counters.verify_problems)} problems"
    return {
        "seed": settings.seed, "rounds": settings.rounds, "seconds_per_round": settings.seconds,
        "kills": server.kills, "kill_kinds": dict(counters.kill_kinds), "restarts": server.starts - 1,
        "puts_acknowledged": rep.puts_acked, "puts_unknown": rep.puts_unknown, "unknown_found": rep.unknown_found,
        "deliveries": rep.deliveries, "redeliveries": rep.redeliveries, "commits": rep.commits,
        "negatives": rep.negatives, "deletes": rep.deletes, "truncates": rep.truncates,
        "disconnects": counters.disconnects, "remaining": rep.remaining, "lost": rep.lost,
        "resurrected": rep.resurrected, "duplicates_index": rep.duplicates_index, "out_of_order": rep.out_of_order,
        "corrupted": rep.corrupted, "reused_unacknowledged": rep.reused, "torn_tails": counters.torn_tails,
        "verify": verify, "verify_problems": counters.verify_problems, "problems": rep.problems,
        "elapsed_seconds": round(seconds, 1), "ok": rep.ok and not counters.verify_problems,
    }


_ROWS = [("rounds", "rounds"), ("kills", "kills"), ("puts acknowledged", "puts_acknowledged"),
         ("puts unknown", "puts_unknown"), ("  of them found", "unknown_found"), ("deliveries", "deliveries"),
         ("redeliveries", "redeliveries"), ("commits", "commits"), ("negatives", "negatives"),
         ("deletes", "deletes"), ("truncates", "truncates"), ("disconnects", "disconnects"),
         ("left at the end", "remaining"), ("lost", "lost"), ("resurrected", "resurrected"),
         ("duplicates-index", "duplicates_index"), ("out-of-order", "out_of_order"), ("corrupted", "corrupted"),
         ("torn tails", "torn_tails"), ("verify", "verify")]


def format_table(s: dict) -> list[str]:
    """The summary as aligned ``name  value`` lines, then the evidence of any failure."""
    kinds = ", ".join(f"{k} {v}" for k, v in s["kill_kinds"].items())
    lines = [f"qserve chaos  seed {s['seed']}  {s['rounds']} rounds x {s['seconds_per_round']:g}s  "
             f"({s['elapsed_seconds']:g}s)"]
    for label, key in _ROWS:
        value = f"{s[key]}  ({kinds})" if key == "kills" else str(s[key])
        lines.append(f"  {label:<18} {value}")
    lines.append("  result             " + ("OK" if s["ok"] else "FAILED"))
    lines += [f"  ! {p}" for p in s["verify_problems"] + s["problems"]]
    if "data_dir" in s:
        lines.append(f"  data kept in {s['data_dir']}")
    return lines
