#!/usr/bin/env python3
"""Benchmark of the storage segment log (storage.QueueLog).

Measures appends/s of 100-byte entries (tags: requestId uuid4 + ts@source) under four durability
policies, the time to reopen (recover) a large log, and RAM per stored entry (tracemalloc):

* ``nosync``     append only, never fsync (what a process crash keeps, not a power failure)
* ``every``      append + sync for every entry
* ``interval``   append; sync inline whenever ``--interval-ms`` has passed since the last sync
* ``group-sim``  simulated group commit: batches of ``--threads`` appends, then one sync round
* ``group``      group commit shaped like the server: one owner thread (the event loop) serves
                 ``--threads`` logical appenders, each waiting for its entry to be durable before
                 appending the next; a flusher thread runs ``ticket.run()`` (the server's
                 ``to_thread.run_sync``) while the owner appends for free appenders. Real OS threads
                 per appender would measure the GIL's hand-off, not the log. ``--more-clients``
                 repeats it with more appenders (e.g. 64,256) to show how rounds fill up.
* ``drain``      dispatch order: poll + delete until ``--drain-entries`` priority entries are gone while
                 the head stays pending (each poll restarts behind the rows already deleted)
* ``group-aio``  group commit as the server runs it: ``--threads`` trio tasks, each appending and
                 waiting until its entry is durable, and a flusher task syncing each round through
                 kernel AIO (``qserve.server.aio``); skipped where that is unavailable.

Durable appends/s counts entries whose durability was confirmed. Example:

    python -m tools.bench.storage --entries 1000000 --appends 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid


from qserve.storage import QueueLog

DATA = os.urandom(100)


def _new_tags() -> dict:
    return {"requestId": str(uuid.uuid4()), "ts": f"{int(time.time())}@bench"}


class TagPool:
    """Tags made before a timed run, so a run times the log, not uuid4(); made on demand once used up."""

    def __init__(self) -> None:
        self._made: list[dict] = []

    def refill(self, n: int) -> None:
        self._made = [_new_tags() for _ in range(n)]

    def take(self) -> dict:
        return self._made.pop() if self._made else _new_tags()


def fresh(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


def bench_nosync(root, n, args, pool: TagPool):
    log = QueueLog.open(fresh(root, "nosync"))
    t0 = time.perf_counter()
    for _ in range(n):
        log.append(DATA, pool.take())
    dt = time.perf_counter() - t0
    log.close()
    return n, dt


def bench_every(root, n, args, pool: TagPool):
    log = QueueLog.open(fresh(root, "every"))
    t0 = time.perf_counter()
    for _ in range(n):
        log.append(DATA, pool.take())
        log.sync()
    dt = time.perf_counter() - t0
    log.close()
    return n, dt


def bench_interval(root, n, args, pool: TagPool):
    log = QueueLog.open(fresh(root, "interval"))
    every = args.interval_ms / 1000
    t0 = last = time.perf_counter()
    for _ in range(n):
        log.append(DATA, pool.take())
        now = time.perf_counter()
        if now - last >= every:
            log.sync()
            last = now
    log.sync()
    dt = time.perf_counter() - t0
    log.close()
    return n, dt


def bench_group_sim(root, n, args, pool: TagPool):
    log = QueueLog.open(fresh(root, "group-sim"))
    k = args.threads
    t0 = time.perf_counter()
    for _ in range(n // k):
        for _ in range(k):
            log.append(DATA, pool.take())
        t = log.sync_begin()
        t.run()
        log.sync_end(t)
    dt = time.perf_counter() - t0
    assert log.durable_seq == log.appended_seq
    log.close()
    return n // k * k, dt


def bench_group(root, n, args, pool: TagPool, clients=None):
    """Server-shaped group commit: one owner thread (the event loop) serves ``clients`` logical
    appenders, each with one append outstanding until it is durable; one flusher thread runs
    ``ticket.run()`` (the server's ``trio.to_thread.run_sync(t.run)``) while the owner keeps
    appending for clients that are free."""
    clients = clients or args.threads
    log = QueueLog.open(fresh(root, f"group{clients}"))
    import queue
    jobs: queue.Queue = queue.Queue()
    finished = threading.Event()

    def flusher():
        while True:
            t = jobs.get()
            if t is None:
                return
            try:
                t.run()
            finally:
                finished.set()

    fl = threading.Thread(target=flusher, daemon=True)
    fl.start()
    free = clients                 # clients ready to append
    waiting: list[int] = []        # seq each busy client waits for (appended in seq order)
    done = rounds = 0
    ticket = None
    t0 = time.perf_counter()
    while done < n:
        while free and done + len(waiting) < n:
            log.append(DATA, pool.take())
            waiting.append(log.appended_seq)
            free -= 1
        if ticket is None:
            ticket = log.sync_begin()
            finished.clear()
            jobs.put(ticket)
        finished.wait()
        log.sync_end(ticket)
        ticket = None
        rounds += 1
        k = 0
        while k < len(waiting) and waiting[k] <= log.durable_seq:
            k += 1
        del waiting[:k]
        done += k
        free += k
    dt = time.perf_counter() - t0
    jobs.put(None)
    fl.join()
    print(f"    group x{clients}: {rounds} fsync rounds, {done / rounds:.1f} entries per round")
    log.close()
    return done, dt


def bench_group_aio(root, n, args, pool: TagPool):
    """Group commit exactly as the server runs it (qserve.backends.local.queues.Queue): ``--threads`` trio tasks
    each append and wait until the entry is durable; one flusher task lets runnable appenders go
    first (a checkpoint), then syncs the round through kernel AIO (`qserve.server.aio.AioSync`).
    Returns None where kernel AIO is unavailable."""
    import trio

    from qserve.server.aio import AioSync
    aio = AioSync.open()
    if aio is None:
        return None
    log = QueueLog.open(fresh(root, "group-aio"))
    left = [n]
    done = [0]
    rounds = [0]

    async def run():
        durable = trio.Event()
        wanted = trio.Event()

        async def appender():
            while left[0] > 0:
                left[0] -= 1
                log.append(DATA, pool.take())
                seq = log.appended_seq
                while log.durable_seq < seq:
                    wanted.set()
                    await durable.wait()
                done[0] += 1

        async def flusher():
            nonlocal durable, wanted
            while True:
                await wanted.wait()
                wanted = trio.Event()
                await trio.lowlevel.checkpoint()
                ticket = log.sync_begin()
                ticket.complete(await aio.fsync(ticket.fds))
                log.sync_end(ticket)
                rounds[0] += 1
                durable.set()
                durable = trio.Event()

        async with trio.open_nursery() as nursery:
            await nursery.start(aio.serve)
            nursery.start_soon(flusher)
            t0 = time.perf_counter()
            async with trio.open_nursery() as appenders:
                for _ in range(args.threads):
                    appenders.start_soon(appender)
            dt = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        return dt

    dt = trio.run(run)
    print(f"    group-aio x{args.threads}: {rounds[0]} fsync rounds, {done[0] / rounds[0]:.1f} entries per round")
    log.close()
    return done[0], dt


def fsync_latency(root, records: int) -> tuple[float, float]:
    """p50 of one group-commit round's fsync on this disk, the way the log writes: ``records``
    records of 150 B written over preallocated zeros, then fsync (200 rounds). Also the p50 of
    appending to the end of a file instead (no preallocation), for comparison."""
    out = []
    for prealloc in (True, False):
        path = os.path.join(root, "fsync-probe")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
        if prealloc:
            zeros = bytes(1 << 20)
            for k in range(8):
                os.pwrite(fd, zeros, k << 20)
            os.fsync(fd)
        rec, off, times = b"x" * 150 * records, 0, []
        for _ in range(200):
            os.pwrite(fd, rec, off)
            off += len(rec)
            t0 = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
        os.close(fd)
        os.remove(path)
        out.append(sorted(times)[len(times) // 2])
    return out[0], out[1]


def bench_drain(root, n, args, pool: TagPool):
    """Poll + delete in dispatch order until a queue of priority entries is drained while its head
    stays pending (a consumer holds it): each poll restarts behind the dead rows. Returns (polls,
    seconds)."""
    log = QueueLog.open(fresh(root, "drain"))
    for i in range(n):
        log.append(DATA, pool.take(), priority=1 + i % 2)
    head = next(log.iter_dispatch())[0]
    polls = 0
    t0 = time.perf_counter()
    while True:
        nxt = next((i for i, _ in log.iter_dispatch() if i != head), None)
        if nxt is None:
            break
        log.delete([nxt])
        polls += 1
    dt = time.perf_counter() - t0
    log.close()
    return polls, dt


def build_big(path: str, n: int, pool: TagPool) -> None:
    if os.path.isdir(path):
        log = QueueLog.open(path)
        count = log.length
        log.close()
        if count == n:
            print(f"  reusing {path} ({n} entries)")
            return
        shutil.rmtree(path)
    print(f"  writing {n} entries to {path} ...", flush=True)
    log = QueueLog.open(path)
    t0 = time.perf_counter()
    for i in range(n):
        log.append(DATA, pool.take())
        if i % 100000 == 99999:
            print(f"    {i + 1} ({time.perf_counter() - t0:.1f} s)", flush=True)
    log.close()


def bench_reopen(root, n, args, pool: TagPool):
    path = args.big_dir or os.path.join(root, "big")
    build_big(path, n, pool)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        log = QueueLog.open(path)
        times.append(time.perf_counter() - t0)
        t1 = time.perf_counter()
        log.find_request_id("x")          # builds the requestId table (deferred by open)
        rid_build = time.perf_counter() - t1
        assert log.length == n
        log.close()
    tracemalloc.start()
    log = QueueLog.open(path)
    after_open = tracemalloc.get_traced_memory()[0]
    log.find_request_id("x")
    next(log.iter_dispatch(), None)       # builds the skip links, as the first watcher poll does
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    log.close()
    return {"reopen_s": min(times), "reopen_all": times, "rid_table_s": rid_build,
            "ram_open": after_open / n, "ram_full": cur / n, "ram_peak": peak / n}


MODES = {"nosync": bench_nosync, "every": bench_every, "interval": bench_interval,
         "group-sim": bench_group_sim, "group": bench_group, "group-aio": bench_group_aio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000, help="size of the reopen/RAM log")
    ap.add_argument("--appends", type=int, default=100_000, help="appends per throughput mode")
    ap.add_argument("--every-appends", type=int, default=3000, help="appends for the sync-every mode")
    ap.add_argument("--threads", type=int, default=16, help="concurrent appenders (group modes)")
    ap.add_argument("--more-clients", default="64,256", help="extra group runs with these appenders")
    ap.add_argument("--interval-ms", type=float, default=50)
    ap.add_argument("--repeat", type=int, default=3, help="reopen repetitions (best is reported)")
    ap.add_argument("--drain-entries", type=int, default=20_000, help="queue size of the drain mode")
    ap.add_argument("--modes", default=",".join(MODES) + ",drain,reopen")
    ap.add_argument("--dir", help="work directory (default: a temp dir, removed afterwards)")
    ap.add_argument("--big-dir", help="keep/reuse the big reopen log here")
    args = ap.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="bench-storage-")
    os.makedirs(root, exist_ok=True)
    rows = []
    pool = TagPool()
    try:
        lat, lat_append = fsync_latency(root, args.threads)
        rows.append((f"fsync of a {args.threads}-record round, p50", f"{lat * 1e6:.0f} us",
                     f"=> at most {args.threads / lat:,.0f} durable/s with {args.threads} outstanding "
                     f"and no CPU spent; appending to the file's end instead: {lat_append * 1e6:.0f} us"))
        for mode in args.modes.split(","):
            print(f"running {mode} ...", flush=True)
            if mode == "reopen":
                r = bench_reopen(root, args.entries, args, pool)
                rows.append((f"reopen {args.entries} entries", f"{r['reopen_s']:.2f} s",
                             "runs: " + ", ".join(f"{t:.2f}" for t in r["reopen_all"])))
                rows.append(("requestId table build (1st lookup)", f"{r['rid_table_s']:.2f} s", ""))
                rows.append(("RAM/entry after open", f"{r['ram_open']:.1f} B", "tracemalloc"))
                rows.append(("RAM/entry incl. requestId table, skip links", f"{r['ram_full']:.1f} B",
                             f"peak during open {r['ram_peak']:.1f} B"))
                continue
            if mode == "drain":
                polls, dt = bench_drain(root, args.drain_entries, args, pool)
                rows.append((f"drain {args.drain_entries} priority entries, head pending",
                             f"{polls / dt:,.0f}", f"polls+deletes/s ({dt / polls * 1e6:.0f} us each)"))
                print(f"    {polls / dt:,.0f} polls/s", flush=True)
                continue
            n = args.every_appends if mode == "every" else args.appends
            pool.refill(n + 64)
            runs = [(mode, None)]
            if mode == "group":
                runs = [(f"group x{args.threads}", None)] + [
                    (f"group x{c}", int(c)) for c in args.more_clients.split(",") if c]
            for label, clients in runs:
                if clients:
                    result = bench_group(root, n, args, pool, clients)
                else:
                    result = MODES[mode](root, n, args, pool)
                if result is None:
                    rows.append((f"appends/s {label}", "-", "kernel AIO is not available here"))
                    continue
                count, dt = result
                rows.append((f"appends/s {label}", f"{count / dt:,.0f}", f"{count} in {dt:.2f} s"))
                print(f"    {count / dt:,.0f} appends/s", flush=True)
                if mode == "nosync":
                    k, cpu = args.threads, dt / count
                    rows.append((f"ceiling, {k} outstanding, here", f"{k / (lat + k * cpu):,.0f}",
                                 f"{k} / (round fsync {lat * 1e6:.0f} us + {k} appends x {cpu * 1e6:.1f} us "
                                 "of CPU, in series: each appender waits for the round)"))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'measure'.ljust(w)}  {'result':>12}  notes")
    print(f"{'-' * w}  {'-' * 12}  -----")
    for name, val, note in rows:
        print(f"{name.ljust(w)}  {val:>12}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
