"""`qserve chaos` on the local segment log: one server killed and restarted on its data directory.

Strategy: a `qserve serve` child (`server.ChaosServer`) runs on a fresh data directory with small
segments (64 KiB), so segment rolls and compactions happen all the time. Once per round the main
task SIGKILLs it at a random moment (a random time, or right when a segment file appears or
disappears: a roll or a compaction), runs the log verifier on the dead server's directory (a torn
tail is allowed there), and restarts it on the same directory and port; the clients reconnect by
themselves. At the end the workload stops, whatever is left is read with non-deleting gets, the
server is stopped gracefully and the log must verify clean.
"""

from __future__ import annotations

import random
import time
from functools import partial

import trio

from .history import History
from .report import say, summarize
from .server import ChaosServer, free_port, segment_files, verify_data_dir
from .workload import POLICY_OPTIONS, SERVICE, TOKEN, Counters, Settings, Workload, drain, new_history

__all__ = ["run_local"]


async def run_local(settings: Settings) -> dict:
    """The whole run in one trio loop; returns the summary (`report.summarize`)."""
    history = new_history(settings)
    counters = Counters(kill_kinds={"timer": 0, "roll": 0, "compaction": 0})
    server = ChaosServer(port=settings.port or free_port(), token=TOKEN,
                         options=("--data-dir", str(settings.data_dir),
                                  "--segment-bytes", str(settings.segment_bytes))
                         + (POLICY_OPTIONS if settings.policies else ()))
    rng = random.Random(settings.seed)
    url = f"{server.url}/api/predict/{SERVICE}"
    began = time.monotonic()
    await server.start()
    say(f"seed {settings.seed}: {settings.rounds} rounds x {settings.seconds:g}s, "
        f"{settings.producers} producers, {settings.consumers} consumers in {settings.groups} groups, "
        f"server on port {server.port}, data in {settings.data_dir}")
    try:
        workload = Workload([url], history, counters, settings, rng)
        await workload.run(partial(_rounds, server, settings, history, counters, rng))
        await drain(url, history, dead_letters=settings.policies)
    finally:
        status = await server.stop()
    if status not in (0, None):
        counters.verify_problems.append(f"graceful stop exited with status {status}:\n{server.log_tail(15)}")
    problems, _ = await trio.to_thread.run_sync(lambda: verify_data_dir(settings.data_dir, allow_torn_tail=False))
    counters.verify_problems += [f"after the final stop: {p}" for p in problems]
    return summarize(history.check(), counters, settings, time.monotonic() - began,
                     kills=server.kills, restarts=server.starts - 1, verify=True)


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
        history.killed()
        counters.kill_kinds[kind] += 1
        problems, torn = await trio.to_thread.run_sync(
            lambda: verify_data_dir(settings.data_dir, allow_torn_tail=True))
        counters.torn_tails += torn
        counters.verify_problems += [f"after kill {number}: {p}" for p in problems]
        took = await server.start()
        counters.restart_seconds += took
        say(f"round {number}/{settings.rounds}: killed at {killed_at:.2f}s ({kind}), restarted in {took:.2f}s; "
            f"{sum(p.ack is not None for p in history.puts.values())} puts acknowledged, "
            f"{len(history.seen)} deliveries so far" + (f"; {len(problems)} VERIFY PROBLEMS" if problems else ""))
        await trio.sleep_until(max(end, trio.current_time()))
