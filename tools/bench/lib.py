"""Shared helpers of the benchmarks `http`, `watch`, `waiters` and `load` (not a public API).

What is here:
- `ServerProc`: a server under test as a child process (qserve, or the bare baseline of
  `http`), started on 127.0.0.1 with an ephemeral port found in its log line, optionally pinned
  to one CPU, with its CPU time read from /proc for the "server CPU %" columns.
- `HTTPConn`, `request_bytes`, `auth_headers`, `ProtocolError`: the minimal keep-alive HTTP/1.1
  client, defined in `client` and re-exported here.
- `LoadRun`: N connections sending requests back to back for a fixed time (after a warm-up),
  recording the latency of every request completed in the measured window.
- `CommitBatcher`: a watcher's manual commits, batched (one ``PUT ?_indexes_=`` in flight).
- statistics (`percentile`, `summary`), output (`progress` on stderr, `table` on stdout), an
  fsync latency probe of the data directory (a durable write cannot be faster than one fsync).

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import h11
import trio

# re-exported as bl.HTTPConn etc.
from .client import LOCALHOST, TOKEN, HTTPConn, ProtocolError, auth_headers, request_bytes

REPO = Path(__file__).resolve().parents[2]
_LISTEN = re.compile(r"listening on http://\[?([0-9a-f.:]+)\]?:(\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ------------------------------------------------------------------------------------ output

def progress(msg: str) -> None:
    """One progress line on stderr (stdout is kept for the final table / JSON)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str], *, file=None) -> str:
    """A plain aligned text table; numbers right-aligned. Returns the text (and prints it if `file`)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_num(r[i]) for r in cells[1:] if r[i]) for i in range(len(headers))]

    def fmt(row):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)).rstrip()

    lines = [fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]]
    text = "\n".join(lines)
    if file is not None:
        print(text, file=file, flush=True)
    return text


def _is_num(s: str) -> bool:
    try:
        float(s.rstrip("x%"))
        return True
    except ValueError:
        return s in ("-", "n/a")


def fmt_num(x: float | None, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:,.{digits}f}".replace(",", "")


def dump_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=_json_default), flush=True)


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


# -------------------------------------------------------------------------------- statistics

def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary(latencies_ns: list[int]) -> dict:
    """p50 / p99 / max in milliseconds of a list of nanosecond latencies."""
    s = sorted(latencies_ns)
    ms = 1e-6
    return {"count": len(s), "p50_ms": percentile(s, 50) * ms, "p99_ms": percentile(s, 99) * ms,
            "max_ms": (s[-1] * ms) if s else float("nan")}


def fsync_probe(directory: Path, rounds: int = 50) -> dict:
    """Latency of append + fsync of a small file in `directory` (the durable-write floor)."""
    fd, path = tempfile.mkstemp(prefix=".fsync-probe-", dir=directory)
    try:
        lat = []
        for _ in range(rounds):
            os.write(fd, b"x" * 160)
            t = time.perf_counter_ns()
            os.fsync(fd)
            lat.append(time.perf_counter_ns() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return summary(lat)


def self_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def system_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs; idle and iowait excluded), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / _CLK_TCK


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def per_item_us(cpu_pct: float | None, per_second: float) -> float | None:
    """CPU microseconds per request (or entry): a cost that, unlike req/s, hardly depends on how busy
    the machine is with other work."""
    if cpu_pct is None or per_second is None or not per_second > 0 or math.isnan(cpu_pct):
        return None
    return round(cpu_pct / 100 / per_second * 1e6, 1)


class CpuMeter:
    """CPU use over a window, in % of one core: this process (the client), the server child, and
    everything else on the machine ("other": other processes, steal) - the benchmarks' noise gauge."""

    def __init__(self, server: "ServerProc | None" = None) -> None:
        self.server = server
        self._t0 = None

    def start(self) -> "CpuMeter":
        self._t0 = (time.perf_counter(), self_cpu_seconds(),
                    self.server.cpu_seconds() if self.server else float("nan"), system_busy_seconds())
        return self

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def stop(self, wall: float | None = None) -> dict:
        """Percentages over the time since `start()` (or over `wall` seconds, if given)."""
        t, cpu, srv, sysb = self._t0
        wall = wall if wall else time.perf_counter() - t
        wall = max(wall, 1e-9)
        client = self_cpu_seconds() - cpu
        server = (self.server.cpu_seconds() - srv) if self.server else 0.0
        other = system_busy_seconds() - sysb - client - server
        return {"client_cpu_pct": round(100 * client / wall, 1),
                "server_cpu_pct": round(100 * server / wall, 1) if self.server else float("nan"),
                "other_cpu_pct": round(max(100 * other / wall, 0.0), 1)}


def environment(args_ns: object | None = None) -> dict:
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(),
            "trio": trio.__version__, "h11": h11.__version__, "platform": sys.platform,
            "args": vars(args_ns) if args_ns is not None else None}


# --------------------------------------------------------------------------------- processes

def pin_self(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def default_pinning(enabled: bool) -> tuple[int | None, int | None]:
    """(server cpu, client cpu): the server alone on CPU 0, the load generator alone on CPU 1."""
    if not enabled or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[1]


class ServerProc:
    """A server under test as a child process on 127.0.0.1 with an ephemeral port.

    `args` must make the child log "listening on http://127.0.0.1:PORT" on stderr. The rest of its
    stderr is kept in `lines` (shown if it fails to start or dies).
    """

    def __init__(self, name: str, args: list[str], *, cpu: int | None = None) -> None:
        self.name = name
        self.args = args
        self.cpu = cpu
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: list[str] = []

    @classmethod
    def qserve(cls, data_dir: Path, *, fsync: str = "always", token: str = TOKEN, cpu: int | None = None,
               extra: Sequence[str] = ()) -> "ServerProc":
        args = [sys.executable, "-m", "qserve", "serve", "--host", LOCALHOST, "--port", "0",
                "--data-dir", str(data_dir), "--token", token, "--fsync", fsync,
                *extra]
        return cls(f"qserve({fsync})", args, cpu=cpu)

    def start(self, timeout: float = 30.0) -> "ServerProc":
        env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        cpu = self.cpu
        preexec = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO),
                                     preexec_fn=preexec)
        found = threading.Event()

        def pump():
            for line in self.proc.stderr:
                line = line.rstrip("\n")
                m = _LISTEN.search(line)
                if m and not found.is_set():
                    self.port = int(m.group(2))
                    found.set()
                else:
                    self.lines.append(line)
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        found.wait(timeout)
        if self.port is None:
            self.kill()
            raise RuntimeError(f"{self.name} did not start:\n" + "\n".join(self.lines[-30:]))
        return self

    def cpu_seconds(self) -> float:
        """User + system CPU time of the child (all its threads) so far."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / _CLK_TCK
        except (OSError, IndexError, ValueError):
            return float("nan")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "ServerProc":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class TempDataDir:
    """A data directory under `parent` (default: the system temp dir), removed afterwards."""

    def __init__(self, parent: str | None = None, prefix: str = "qserve-bench-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------------ load run

@dataclasses.dataclass
class LoadResult:
    requests: int           # completed inside the measured window
    seconds: float          # measured window
    errors: int             # unexpected statuses / protocol errors (whole run)
    latencies_ns: list[int]
    cpu: dict = dataclasses.field(default_factory=dict)   # CpuMeter percentages over the window
    first_error: str | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        s = summary(self.latencies_ns)
        return {"requests": self.requests, "seconds": round(self.seconds, 3), "req_per_s": round(self.rate, 1),
                "p50_ms": round(s["p50_ms"], 3), "p99_ms": round(s["p99_ms"], 3), "max_ms": round(s["max_ms"], 3),
                "errors": self.errors, "first_error": self.first_error, **self.cpu,
                "server_us_per_req": per_item_us(self.cpu.get("server_cpu_pct"), self.rate),
                "client_us_per_req": per_item_us(self.cpu.get("client_cpu_pct"), self.rate)}


async def on_each(conns: Sequence[HTTPConn], worker: Callable[[HTTPConn], Awaitable[None]]) -> None:
    """Run ``worker(conn)`` for every connection at once; close them all when done (or cancelled)."""
    try:
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(worker, conn)
    finally:
        for conn in conns:
            await trio.aclose_forcefully(conn.stream)


async def load_run(port: int, make_request: Callable[[int, int], bytes], *, connections: int,
                   seconds: float, warmup: float, ok_status: frozenset[int] = frozenset({200}),
                   parser: str = "fast", label: str = "", server: ServerProc | None = None,
                   check: Callable[[int, bytes, bytes], str | None] | None = None,
                   stop_on_status: frozenset[int] = frozenset()) -> LoadResult:
    """`connections` keep-alive connections, each sending `make_request(conn_no, seq)` back to back
    for `warmup + seconds`; requests that complete inside the last `seconds` are counted and their
    latencies (send start -> response fully read) kept. A status in `stop_on_status` ends that
    connection's loop early (e.g. 204 when a queue being drained is empty)."""
    conns = [await HTTPConn.open(port, parser) for _ in range(connections)]
    clock = time.perf_counter_ns
    t_begin = clock()
    t_start = t_begin + int(warmup * 1e9)
    t_end = t_start + int(seconds * 1e9)
    latencies: list[int] = []
    state = {"errors": 0, "first_error": None, "t_last": t_start}
    meter = CpuMeter(server)

    async def worker(n: int, conn: HTTPConn) -> None:
        seq = 0
        record = latencies.append
        while True:
            raw = make_request(n, seq)
            seq += 1
            t0 = clock()
            try:
                status, head, body = await conn.request(raw)
            except (ProtocolError, trio.BrokenResourceError, OSError, h11.ProtocolError) as exc:
                state["errors"] += 1
                state["first_error"] = state["first_error"] or f"{type(exc).__name__}: {exc}"
                return
            t1 = clock()
            if status in stop_on_status:
                return
            problem = None
            if status not in ok_status:
                problem = f"status {status}: {body[:80]!r}"
            elif check is not None:
                problem = check(status, head, body)
            if problem:
                state["errors"] += 1
                state["first_error"] = state["first_error"] or problem
            if t_start <= t1 <= t_end:
                record(t1 - t0)
                state["t_last"] = t1
            if t1 >= t_end:
                return

    async def reporter() -> None:
        last_n, last_t = 0, clock()
        started = False
        while True:
            await trio.sleep(1.0)
            now = clock()
            if not started and now >= t_start:
                started = True
            n = len(latencies)
            if started:
                progress(f"  {label}: {(n - last_n) / ((now - last_t) / 1e9):,.0f} req/s"
                         + (f", errors {state['errors']}" if state["errors"] else ""))
            last_n, last_t = n, now

    async def start_marker() -> None:
        await trio.sleep((t_start - clock()) / 1e9)
        meter.start()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reporter)
            nursery.start_soon(start_marker)
            async with trio.open_nursery() as workers:
                for i, c in enumerate(conns):
                    workers.start_soon(worker, i, c)
            nursery.cancel_scope.cancel()
    finally:
        for c in conns:
            await trio.aclose_forcefully(c.stream)
    if not meter.started:   # ended during the warm-up (e.g. a drained queue)
        meter.start()
    if clock() >= t_end:
        window = seconds
    else:  # every connection stopped early: measure up to the last completed request
        window = max(state["t_last"] - t_start, 0) / 1e9
    return LoadResult(len(latencies), window, state["errors"], latencies, meter.stop(window or None),
                      state["first_error"])


# --------------------------------------------------------------------------- qserve helpers

async def put_many(port: int, service: str, count: int, *, connections: int = 32, body: bytes = b"x" * 100,
                   token: str = TOKEN, label: str = "prefill",
                   tags: str = "") -> float:
    """Put `count` entries as fast as possible; returns the seconds it took."""
    target = f"/api/predict/{service}" + (f"?{tags}" if tags else "")
    raw = request_bytes("POST", target, port, body=body, headers=auth_headers(token))
    remaining = [count]
    errors: list[str] = []
    t0 = time.perf_counter()

    async def worker():
        conn = await HTTPConn.open(port)
        try:
            while remaining[0] > 0:
                remaining[0] -= 1
                status, _, rbody = await conn.request(raw)
                if status != 200:
                    errors.append(f"{status} {rbody[:80]!r}")
                    return
        finally:
            await conn.aclose()

    async def reporter():
        while True:
            await trio.sleep(2.0)
            done = count - max(remaining[0], 0)
            progress(f"  {label}: {done}/{count} put ({done / (time.perf_counter() - t0):,.0f}/s)")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reporter)
        async with trio.open_nursery() as workers:
            for _ in range(min(connections, count)):
                workers.start_soon(worker)
        nursery.cancel_scope.cancel()
    if errors:
        raise RuntimeError(f"{label}: put failed: {errors[0]}")
    return time.perf_counter() - t0


async def attributes(port: int, service: str, token: str = TOKEN) -> dict:
    conn = await HTTPConn.open(port)
    try:
        status, _, body = await conn.request(
            request_bytes("GET", f"/api/predict/{service}?_attrs_=true", port, headers=auth_headers(token)))
    finally:
        await conn.aclose()
    if status != 200:
        raise RuntimeError(f"attributes: {status} {body[:80]!r}")
    return json.loads(body)


# ------------------------------------------------------------------------------ watch commits

class CommitBatcher:
    """Manual commits of one watcher: every index received since the last commit was sent goes into
    the next ``PUT /api/predict/SERVICE?_indexes_=i,j,..``, which is sent as soon as the previous one
    is answered (one commit in flight). Not thread-safe; one trio task calls `add`, `run` is a task.

    Args:
        conn: anything with ``await conn.request(raw) -> (status, head, body)`` (an `HTTPConn`).
        headers: the token and the watcher's Uid / Gid headers.
        tally: counts ``commits`` (requests) and ``committed`` (indexes), and has ``error(msg)``
            (called for a non-200 answer).
        on_commit: called after each answered commit (e.g. to check whether a run is done).
    """

    def __init__(self, conn, port: int, service: str, headers: Sequence[tuple[str, str]], tally,
                 on_commit: Callable[[], None] | None = None) -> None:
        self.conn = conn
        self.port = port
        self.target = f"/api/predict/{service}?_indexes_="
        self.headers = headers
        self.tally = tally
        self.on_commit = on_commit
        self._pending: list[int] = []
        self._wake = trio.Event()

    def add(self, index: int) -> None:
        """Queue `index` for the next commit."""
        self._pending.append(index)
        self._wake.set()

    async def run(self) -> None:
        """Commit until cancelled. Raises what ``conn.request`` raises."""
        while True:
            if not self._pending:
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            batch = self._pending[:]
            self._pending.clear()
            raw = request_bytes("PUT", self.target + "%2C".join(map(str, batch)), self.port, headers=self.headers)
            self.tally.commits += 1
            status, _, body = await self.conn.request(raw)
            if status != 200:
                self.tally.error(f"commit: {status} {body[:80]!r}")
            self.tally.committed += len(batch)
            if self.on_commit is not None:
                self.on_commit()
