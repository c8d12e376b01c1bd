"""Fuzzing the running server for memory: one server, many iterations of fuzz traffic (HTTP
operations, broken framing, misbehaving WebSocket watchers), `tracemalloc` before and after; per-request
or per-connection state that is never freed fails it.

Time: real time, bounded by `trio.fail_after`.
"""

from __future__ import annotations

import gc
import os
import random
import tracemalloc

import trio

from ..helpers.fuzz_model import Model
from ..helpers.fuzz_ops import FRAMING
from ..helpers.fuzz_wire import (MAX_HEADER, SETTINGS, WS_MAX, check_answer, exchange, fresh_dir, healthy,
                                 parse_answers, render, ws_frame)
from ..helpers.inproc import running_server
from ..helpers.rawws import RawWatcher

async def one_iteration(srv, rng: random.Random, model: Model, i: int) -> None:
    """A pseudo-random burst of fuzz traffic that leaves the modelled queue as it found it."""
    ops = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0:
            ops.append(render(b"POST", "/api/predict/mem", [("k", str(i)), ("_zz_", "x")], [], rng.randbytes(rng.randint(0, 300))))
        elif kind == 1:
            ops.append(render(b"GET", "/api/predict/mem", [("_raw_", "false"), ("_length_", "3")], [], b""))
        elif kind == 2:
            ops.append(rng.choice(FRAMING)[1])
        elif kind == 3:
            ops.append(render(rng.choice([b"PATCH", b"FOO", b"GET"]), "/api/predict/mem/" + "x" * rng.randint(0, 3000), [], [], b""))
        else:
            ops.append(render(b"GET", "/api/predict/mem", [("_attrs_", "true")],
                              [(b"X-Huge", b"h" * rng.choice([10, MAX_HEADER + 10]))], b""))
    for data in ops:
        for a in parse_answers(await exchange(srv.listener, data), [b"GET"] * 4):
            check_answer(a)
    # a websocket watcher that misbehaves now and then
    if i % 10 == 0:
        w = await RawWatcher.connect(srv.listener, "mem", "_window_=2", f"m{i % 3}")
        await w.send_raw(ws_frame(0x2, b"o" * (WS_MAX + 1)) if i % 20 else ws_frame(0x2, b"r", rsv=2))
        await w.read_until_closed()
        await trio.aclose_forcefully(w.stream)
    # back to empty: nothing the queue holds may explain growth
    await exchange(srv.listener, render(b"DELETE", "/api/predict/mem", [("_trunc_", "true"), ("_index_", "999999")], [], b""))


async def test_memory_is_bounded_over_many_fuzz_iterations(tmp_path):
    """One server, many iterations of fuzz traffic in one process; the Python heap after the last
    iteration must be close to what it was after a warm-up. (The queue is emptied each iteration,
    the set of queues is fixed, so legitimate state does not grow; what could grow is per-request or
    per-connection state that is never freed.)"""
    rng = random.Random(1234)
    model = Model()
    n = int(os.environ.get("QSERVE_FUZZ_MEMORY_ITERATIONS", "200"))
    with trio.fail_after(120):
        async with running_server(fresh_dir(tmp_path), **SETTINGS) as srv:
            for i in range(40):
                await one_iteration(srv, rng, model, i)
            gc.collect()
            tracemalloc.start(1)
            try:
                before = tracemalloc.take_snapshot()
                for i in range(40, 40 + n):
                    await one_iteration(srv, rng, model, i)
                gc.collect()
                after = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
            top = after.compare_to(before, "lineno")[:5]
            # trio prunes stale deadline-heap entries lazily (up to ~1000 kept): some growth is noise
            assert growth < 512 * 1024, f"heap grew by {growth} bytes over {n} iterations: {top}"
            assert srv.server.http.statistics()["connections_open"] <= 1
            await healthy(srv.listener)
