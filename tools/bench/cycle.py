"""Where a ping-pong benchmark's time goes: the CPU each side spends in its steady phase.

A consumer that commits what it received and waits for the answer before it reads on (peerbench's
``watch_rate.py``, ``redis_streams.py group``) takes turns with the server: per cycle of 10 entries
the server works, then the consumer, then the server again. So a cycle's wall time is at least the
consumer's CPU plus the server's CPU, and whatever is left is waiting (an fsync's disk time, a
halted vCPU's wake-up). `run_measured` runs such a load generator and, once its steady phase has
begun (``started()``), reads three figures over a window: the server process's CPU, the load
generator's CPU (both from ``/proc/PID/stat``) and how busy the servers' CPU was as a whole
(``/proc/stat``: the server plus the kernel's work there, an AIO fsync's worker and the network's
softirqs included). `per_cycle` turns them into microseconds per cycle.

The window starts ``delay`` after the phase is seen and lasts ``window`` seconds; a phase shorter
than that (``--quick``'s 300 entries) gives no figures, not wrong ones.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from . import lib as bl

__all__ = ["CpuWindow", "run_measured", "per_cycle", "established", "redis_calls"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_ticks(pid: int) -> int | None:
    """User + system CPU of a live process in clock ticks; None once it has ended (or is a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[11]) + int(fields[12])


def cpu_busy_ticks(cpu: int | None) -> int | None:
    """Busy clock ticks of one CPU (user, nice, system, irq, softirq; not idle, iowait or steal), or
    of the whole machine when ``cpu`` is None."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    try:
        with open("/proc/stat") as f:
            for line in f:
                fields = line.split()
                if fields and fields[0] == name:
                    user, nice, system, _idle, _iowait, irq, softirq = map(int, fields[1:8])
                    return user + nice + system + irq + softirq
    except (OSError, ValueError):
        pass
    return None


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


def redis_calls(port: int, command: str) -> int | None:
    """How many times the Redis server on 127.0.0.1:``port`` has run ``command`` (``INFO
    commandstats``; 0 before the first); None when it cannot be asked."""
    try:
        with socket.create_connection((bl.LOCALHOST, port), timeout=1.0) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return None
                data += chunk
                head, _, rest = data.partition(b"\r\n")
                if head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                    break
    except (OSError, ValueError):
        return None
    _, found, tail = data.partition(f"cmdstat_{command.lower()}:calls=".encode())
    return int(tail.split(b",", 1)[0]) if found else 0


class CpuWindow:
    """The three CPU readings over one window of a load generator's steady phase (module docstring).
    ``result``: seconds of CPU of the server and of the load generator, busy seconds of the servers'
    CPU and the window's wall seconds; None when the phase ended (or never began) before the window did."""

    def __init__(self, server_pid: int, servers_cpu: int | None, started: Callable[[], bool], *,
                 delay: float = 0.2, window: float = 1.0, poll: float = 0.01) -> None:
        self.server_pid, self.servers_cpu, self.started = server_pid, servers_cpu, started
        self.delay, self.window, self.poll = delay, window, poll
        self.result: dict[str, float] | None = None

    def _reading(self, client_pid: int) -> tuple[int, int, int, float] | None:
        s, c, k = process_ticks(self.server_pid), process_ticks(client_pid), cpu_busy_ticks(self.servers_cpu)
        if s is None or c is None or k is None:
            return None
        return s, c, k, time.monotonic()

    def run(self, client_pid: int, until: float) -> None:
        """Wait (to the monotonic time ``until`` at most) for the phase, then read the window."""
        while not self.started():
            if process_ticks(client_pid) is None or time.monotonic() > until:
                return
            time.sleep(self.poll)
        time.sleep(self.delay)
        first = self._reading(client_pid)
        if first is None:
            return
        time.sleep(self.window)
        last = self._reading(client_pid)
        if last is None:
            return   # the client ended inside the window: its phase was shorter than the window
        self.result = {"server_s": (last[0] - first[0]) / _CLK_TCK, "client_s": (last[1] - first[1]) / _CLK_TCK,
                       "servers_cpu_busy_s": (last[2] - first[2]) / _CLK_TCK, "wall_s": last[3] - first[3]}


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
    CPU, the servers' CPU busy, the load generator's CPU, and the cycle's wall time."""
    if not result or not result["wall_s"] > 0 or not per_second > 0:
        return None
    cycles = per_second / per * result["wall_s"]
    return {"server_us": result["server_s"] / cycles * 1e6,
            "servers_cpu_us": result["servers_cpu_busy_s"] / cycles * 1e6,
            "client_us": result["client_s"] / cycles * 1e6,
            "wall_us": per / per_second * 1e6}
