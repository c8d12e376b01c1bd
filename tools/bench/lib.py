"""Shared helpers of the benchmarks `http`, `watch`, `waiters` and `load` (not a public API).

What is here:
- `ServerProc`: a server under test as a child process (qserve, or the bare baseline of
  `http`), started on 127.0.0.1 with an ephemeral port found in its log line, optionally pinned
  to one CPU, with its CPU time read from /proc for the "server CPU %" columns.
- `HTTPConn`, `request_bytes`, `auth_headers`, `ProtocolError`: the minimal keep-alive HTTP/1.1
  client, defined in `client` and re-exported here.
- statistics (`percentile`, `summary`), output (`progress` on stderr, `table` on stdout), an
  fsync latency probe of the data directory (a durable write cannot be faster than one fsync).

The load runs, bulk puts and watch commits built on these are in `drive`. Everything talks to
127.0.0.1 only.
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
from collections.abc import Sequence
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


def system_busy_seconds(cpu: int | None = None) -> float:
    """CPU seconds the whole machine (or only CPU ``cpu``) spent busy (idle and iowait excluded),
    from /proc/stat."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    try:
        with open("/proc/stat") as f:
            line = next((ln for ln in f if ln.startswith(name + " ")), "")
        fields = [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    if len(fields) < 8:
        return float("nan")
    # user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / _CLK_TCK


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads) so far; None once it has
    ended or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        if fields[0] in ("Z", "X"):
            return None
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


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
        seconds = process_cpu_seconds(self.proc.pid)
        return float("nan") if seconds is None else seconds

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
