"""Where a ping-pong benchmark's time goes: the CPU each side spends in its steady phase.

A consumer that commits what it received and waits for the answer before it reads on (peerbench's
``watch_rate.py``, ``redis_streams.py group``) takes turns with the server: per cycle of 10 entries
the server works, then the consumer, then the server again. So a cycle's wall time is at least the
consumer's CPU plus the server's CPU, and whatever is left is waiting (an fsync's disk time, a
halted vCPU's wake-up). `run_measured` runs such a load generator and, once its steady phase has
begun (``started()``), reads three figures over a window: the server process's CPU, the load
generator's CPU (both from ``/proc/PID/stat``) and how busy the servers' CPU was as a whole
(`lib.system_busy_seconds` of that CPU: the server plus the kernel's work there, an AIO fsync's
worker and the network's softirqs, and any time the hypervisor took it away). `per_cycle` turns
them into microseconds per cycle. A qserve server also reports the seconds its idle loop spent
polling for arrivals (``qserve_idle_poll_seconds_total``, `--idle-poll-us`): CPU it used only
because nothing else wanted it, shown apart (``polled``) so that the server's CPU can be read
without it.

The window starts ``delay`` after the phase is seen and lasts ``window`` seconds; a phase shorter
than that (``--quick``'s 300 entries) gives no figures, not wrong ones, and the reading stops as
soon as the load generator has ended.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import lib as bl

__all__ = ["CpuWindow", "run_measured", "per_cycle", "established", "idle_poll_seconds", "metric_sums",
           "metrics_text", "sums_of", "bucket_sums", "slow_rounds"]

def established(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local port is ``port`` (IPv4 and IPv6)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "01" and int(fields[1].rpartition(":")[2], 16) == port:
                        n += 1
        except OSError:
            continue
    return n


def metrics_text(port: int, token: str | None = None) -> str | None:
    """GET /metrics of the qserve on 127.0.0.1:``port``, as text; None when it cannot be read."""
    conn = http.client.HTTPConnection(bl.LOCALHOST, port, timeout=2.0)
    try:
        conn.request("GET", "/metrics", headers={"Authorization": token} if token else {})
        response = conn.getresponse()
        body = response.read()
    except OSError:
        return None
    finally:
        conn.close()
    return body.decode("utf-8", "replace") if response.status == 200 else None


def sums_of(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The samples of ``text`` (Prometheus's format) named ``names``, each summed over its labels
    (a name with no sample is left out)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        name = line.partition("{")[0].partition(" ")[0]
        if name in names:
            sums[name] = sums.get(name, 0.0) + float(line.rpartition(" ")[2])
    return sums


def bucket_sums(text: str, family: str) -> dict[float, float]:
    """The cumulative buckets of histogram ``family`` in ``text``, each bound's count summed over the
    other labels (every queue's): {upper bound in seconds (``inf`` for +Inf): observations <= it}."""
    out: dict[float, float] = {}
    prefix = family + "_bucket{"
    for line in text.splitlines():
        if line.startswith(prefix):
            le = line.partition('le="')[2].partition('"')[0]
            bound = float("inf") if le == "+Inf" else float(le)
            out[bound] = out.get(bound, 0.0) + float(line.rpartition(" ")[2])
    return out


def metric_sums(port: int, names: tuple[str, ...], token: str | None = None) -> dict[str, float] | None:
    """`sums_of` one GET /metrics of the qserve on 127.0.0.1:``port``; None when it cannot be read."""
    text = metrics_text(port, token)
    return None if text is None else sums_of(text, names)


def idle_poll_seconds(port: int, token: str | None = None) -> float | None:
    """``qserve_idle_poll_seconds_total`` of the qserve on 127.0.0.1:``port`` (one GET /metrics);
    None when it cannot be read or the server does not poll."""
    sums = metric_sums(port, ("qserve_idle_poll_seconds_total",), token)
    return None if sums is None else sums.get("qserve_idle_poll_seconds_total")


class CpuWindow:
    """The three CPU readings over one window of a load generator's steady phase (module docstring).
    ``result``: seconds of CPU of the server and of the load generator, busy seconds of the servers'
    CPU and the window's wall seconds; None when the phase ended (or never began) before the window did.
    The default window fits `watch_rate.py`'s 15,000 entries at ~13,000/s (~1.15 s): with 0.2 + 1.0 s
    a faster consumer left the ratios tool without these rows (four of its runs on 2026-12-08)."""

    def __init__(self, server_pid: int, servers_cpu: int | None, started: Callable[[], bool], *,
                 delay: float = 0.1, window: float = 0.8, poll: float = 0.01,
                 polled: Callable[[], float | None] | None = None) -> None:
        self.server_pid, self.servers_cpu, self.started = server_pid, servers_cpu, started
        self.polled = polled   # the server's idle-poll seconds so far (qserve's /metrics), or None
        self.delay, self.window, self.poll = delay, window, poll
        self.result: dict[str, float] | None = None

    def _reading(self, client_pid: int) -> tuple[float, float, float, float, float | None] | None:
        polled = self.polled() if self.polled is not None else None
        s, c = bl.process_cpu_seconds(self.server_pid), bl.process_cpu_seconds(client_pid)
        k = bl.system_busy_seconds(self.servers_cpu)
        if s is None or c is None or k != k:   # a process gone, or /proc/stat unreadable (nan)
            return None
        return s, c, k, time.monotonic(), polled

    def _wait(self, client_pid: int, until: float) -> bool:
        """Until the monotonic time ``until``; False as soon as the client has ended."""
        while time.monotonic() < until:
            if bl.process_cpu_seconds(client_pid) is None:
                return False
            time.sleep(self.poll)
        return True

    def run(self, client_pid: int, until: float) -> None:
        """Wait (to the monotonic time ``until`` at most) for the phase, then read the window."""
        while not self.started():   # polled for as long as the client lives
            if time.monotonic() >= until or not self._wait(client_pid, time.monotonic() + self.poll):
                return
        if not self._wait(client_pid, time.monotonic() + self.delay):
            return
        first = self._reading(client_pid)
        if first is None or not self._wait(client_pid, first[3] + self.window):
            return   # the client ended inside the window: its phase was shorter than the window
        last = self._reading(client_pid)
        if last is None:
            return
        self.result = {"server_s": last[0] - first[0], "client_s": last[1] - first[1],
                       "servers_cpu_busy_s": last[2] - first[2], "wall_s": last[3] - first[3]}
        if first[4] is not None and last[4] is not None:
            self.result["polled_s"] = last[4] - first[4]


def run_measured(args: list[str], meter: CpuWindow, *, cpu: int | None, timeout: float,
                 cwd: Path | None = None) -> str:
    """Run a load generator to its end (pinned to ``cpu``) while ``meter`` reads its window in a
    thread; its stdout. Raises RuntimeError when it fails or outlives ``timeout``."""
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd or bl.REPO,
                            preexec_fn=(lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None)
    reader = threading.Thread(target=meter.run, args=(proc.pid, time.monotonic() + timeout), daemon=True)
    reader.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{Path(args[1] if len(args) > 1 else args[0]).name} did not finish within "
                           f"{timeout:.0f} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        reader.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} exited {proc.returncode}: "
                           f"{(err.strip().splitlines() or ['no output'])[-1]}")
    return out


def per_cycle(result: dict[str, float] | None, per_second: float, per: int = 10) -> dict[str, float] | None:
    """Microseconds per cycle of ``per`` items, at ``per_second`` items/s over the run: the server's
    CPU, the servers' CPU busy, the load generator's CPU, and the cycle's wall time; with
    ``polled_us`` too when the server reported its idle polling (part of its CPU)."""
    if not result or not result["wall_s"] > 0 or not per_second > 0:
        return None
    cycles = per_second / per * result["wall_s"]
    out = {"server_us": result["server_s"] / cycles * 1e6,
           "servers_cpu_us": result["servers_cpu_busy_s"] / cycles * 1e6,
           "client_us": result["client_s"] / cycles * 1e6,
           "wall_us": per / per_second * 1e6}
    if "polled_s" in result:
        out["polled_us"] = result["polled_s"] / cycles * 1e6
    return out


SLOW_ROUND = 0.005   # seconds: a group-commit round longer than this is slow for the latency rows (their p99 goal)


def slow_rounds(before: str | None, after: str | None) -> dict | None:
    """The group-commit rounds between two /metrics texts (``qserve_fsync_round_seconds``, every
    queue): ``{"rounds", "slow"}`` (over `SLOW_ROUND`) and ``"longest_ms"``, the upper bound of the
    highest bucket that gained a round (left out past the last bound); None without both texts or
    without rounds."""
    if before is None or after is None:
        return None
    b0, b1 = bucket_sums(before, "qserve_fsync_round_seconds"), bucket_sums(after, "qserve_fsync_round_seconds")
    moved = {bound: b1[bound] - b0.get(bound, 0.0) for bound in sorted(b1)}
    total = moved.get(float("inf"), 0.0)
    if total <= 0:
        return None
    under = max((n for bound, n in moved.items() if bound <= SLOW_ROUND), default=0.0)
    longest = min(bound for bound, n in moved.items() if n >= total)
    out = {"rounds": total, "slow": total - under}
    if longest != float("inf"):
        out["longest_ms"] = longest * 1e3
    return out
