"""What waking a sleeping CPU costs on this machine: a 1-byte TCP ping-pong over loopback between
two processes pinned to different CPUs, with the answering side asleep in ``recv`` or polling a
non-blocking socket (the measuring side sleeps in ``recv`` both times). The difference is one
wake-up of a sleeping CPU less what a look costs: what `--idle-poll-us` (``qserve/server/idlepoll.py``)
saves a request that arrives while the server's loop would sleep.

    python -m tools.bench.wakeup              # 20,000 round trips each way, alternating, twice
    python -m tools.bench.wakeup --rounds 1 --count 2000   # smoke run

One line per run (p50 and p90 of the round trip, microseconds), then the medians. On the 2-vCPU VM
of the README's figures (a guest whose idle vCPU halts at once, ``guest_halt_poll_ns=0``) sleeping
gave p50 ~70-77 us and polling ~21-24 us.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time

from . import lib as bl


def answer(port: int, poll: bool, cpu: int | None) -> None:
    """The answering side (a child process): echo each byte until the peer closes."""
    bl.pin_self(cpu)
    with socket.create_connection((bl.LOCALHOST, port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(not poll)
        deadline = time.monotonic() + 120   # bounded even if the peer vanished without closing
        while time.monotonic() < deadline:
            try:
                data = sock.recv(64)
            except BlockingIOError:
                continue
            if not data:
                return
            sock.sendall(data)


def run(poll: bool, count: int, cpus: tuple[int | None, int | None]) -> dict:
    """``count`` round trips against an answering child; p50 and p90 in microseconds."""
    with socket.socket() as listener:
        listener.bind((bl.LOCALHOST, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        child = subprocess.Popen([sys.executable, "-m", "tools.bench.wakeup", "--answer", str(port),
                                  "--cpu", "" if cpus[0] is None else str(cpus[0])] + (["--poll"] if poll else []),
                                 cwd=bl.REPO)
        try:
            listener.settimeout(30)
            sock, _ = listener.accept()
            with sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                times = []
                for i in range(count):
                    t = time.perf_counter_ns()
                    sock.sendall(b"x")
                    if not sock.recv(64):
                        raise RuntimeError("the answering process closed early")
                    times.append(time.perf_counter_ns() - t)
        finally:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    times.sort()
    return {"p50_us": bl.percentile(times, 50) / 1000, "p90_us": bl.percentile(times, 90) / 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench.wakeup", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=20000, help="round trips per run (default 20000)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating (default 2)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the two processes to CPUs 0 and 1")
    p.add_argument("--answer", type=int, help=argparse.SUPPRESS)   # the child: the port to answer on
    p.add_argument("--cpu", default="", help=argparse.SUPPRESS)
    p.add_argument("--poll", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.answer is not None:
        answer(args.answer, args.poll, int(args.cpu) if args.cpu else None)
        return 0
    if args.count < 1 or args.rounds < 1:
        print("wakeup: --count and --rounds must be >= 1", file=sys.stderr)
        return 2
    server_cpu, client_cpu = bl.default_pinning(not args.no_pin)
    bl.pin_self(client_cpu)
    results: dict[str, list[dict]] = {"sleeping": [], "polling": []}
    for r in range(args.rounds):
        for side in ("sleeping", "polling"):
            res = run(side == "polling", args.count, (server_cpu, client_cpu))
            results[side].append(res)
            bl.progress(f"round {r + 1}/{args.rounds}, answering side {side}: round trip p50 {res['p50_us']:.1f} us, "
                        f"p90 {res['p90_us']:.1f} us")
    sleeping = statistics.median(r["p50_us"] for r in results["sleeping"])
    polling = statistics.median(r["p50_us"] for r in results["polling"])
    print(f"round trip p50: {sleeping:.1f} us with the answering side asleep, {polling:.1f} us with it polling "
          f"(the answering side's wake-up: {sleeping - polling:.1f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
