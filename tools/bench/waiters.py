#!/usr/bin/env python3
"""Waiting clients benchmark: sink puts/s while many clients long-poll the sink for their results.

The async-inference pattern: each client puts a request, then waits with
``GET {service}/sink?requestId=<its id>&_timeout_=...`` until a worker puts the result there. A put
must wake only the client it answers; this measures sink puts/s (keep-alive connections, durable,
the server's default ``--fsync always``) with 0 and with N such clients parked on the sink, and
their ratio. Every waiting client gets its own result at the end (checked).

    python -m tools.bench.waiters                  # 0 and 300 waiting clients, 3 s each
    python -m tools.bench.waiters --waiters 0,100,1000 --connections 4

Talks to 127.0.0.1 only; at most ``max(--waiters) + --connections`` connections.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from . import drive, lib as bl

SERVICE = "bench-wait"


async def run_one(port: int, waiters: int, args, server: bl.ServerProc) -> dict:
    """Park `waiters` gets on the sink, measure puts, then answer every waiter and check it."""
    answered: dict[int, tuple[int, bytes]] = {}
    headers = bl.auth_headers()
    parked = 0

    async def waiter(i: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
        nonlocal parked
        conn = await bl.HTTPConn.open(port)
        raw = bl.request_bytes("GET", f"/api/predict/{SERVICE}/sink?requestId=wait-{waiters}-{i}"
                               f"&_timeout_=600s&_auto_delete_=false", port, headers=headers)
        parked += 1
        task_status.started()
        try:
            status, _, body = await conn.request(raw)
            answered[i] = (status, body)
        finally:
            await trio.aclose_forcefully(conn.stream)

    async with trio.open_nursery() as nursery:
        for i in range(waiters):
            await nursery.start(waiter, i)
        await trio.sleep(0.5)                   # let the server park them all
        body = b"x" * 100
        result = await drive.load_run(
            port, lambda n, seq: bl.request_bytes("POST", f"/api/predict/{SERVICE}/sink?requestId=other-{n}-{seq}",
                                                  port, body=body, headers=headers),
            connections=args.connections, seconds=args.seconds, warmup=args.warmup,
            label=f"{waiters} waiting", server=server)
        # now answer every waiting client with its own result
        conn = await bl.HTTPConn.open(port)
        for i in range(waiters):
            raw = bl.request_bytes("POST", f"/api/predict/{SERVICE}/sink?requestId=wait-{waiters}-{i}", port,
                                   body=b"result", headers=headers)
            status, _, _ = await conn.request(raw)
            if status != 200:
                raise RuntimeError(f"answer put failed: {status}")
        await trio.aclose_forcefully(conn.stream)
        with trio.fail_after(60):
            while len(answered) < waiters:
                await trio.sleep(0.05)
    wrong = [i for i, (status, body) in answered.items() if status != 200 or body != b"result"]
    return {"waiters": waiters, "parked": parked, "puts_per_s": result.rate,
            "p50_ms": bl.summary(result.latencies_ns)["p50_ms"], "errors": result.errors + len(wrong),
            "srv_cpu": result.cpu.get("server_cpu_pct") if result.cpu else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waiters", default="0,300", help="comma list of waiting-client counts")
    ap.add_argument("--connections", type=int, default=1, help="put connections (back to back)")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--data-dir", default=None, help="parent of the temporary data directory")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="pin server to CPU 0 and this process to CPU 1")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.waiters.split(",") if x]
    srv_cpu, cli_cpu = bl.default_pinning(args.pin)
    bl.pin_self(cli_cpu)
    rows = []
    with bl.TempDataDir(args.data_dir) as data, bl.ServerProc.qserve(data, cpu=srv_cpu) as server:
        for n in counts:
            bl.progress(f"{n} waiting clients ...")
            rows.append(trio.run(run_one, server.port, n, args, server))
    base = rows[0]["puts_per_s"] if rows and rows[0]["waiters"] == 0 else None
    for r in rows:
        r["ratio"] = r["puts_per_s"] / base if base else None
    if args.json:
        print(json.dumps(rows))
    else:
        print(bl.table([(r["waiters"], f"{r['puts_per_s']:,.0f}", bl.fmt_num(r["p50_ms"], 2),
                         bl.fmt_num(r["ratio"], 2) + ("x" if r["ratio"] else ""),
                         bl.fmt_num(r["srv_cpu"]) + "%" if r["srv_cpu"] is not None else "-", r["errors"])
                        for r in rows],
                       ["waiting clients", "sink puts/s", "p50 ms", "vs none", "srv cpu", "errors"]), end="")
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
