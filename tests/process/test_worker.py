"""`qserve worker` and `qserve serve --worker` against real server processes, with the official SDK
putting requests and reading results, and one in-process run with the qserve client. The pure
pieces (handler loading, result encoding, service choice, CLI refusals): tests/unit/test_worker_cli.py."""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import trio

from qserve.client import QueueClient
from qserve.worker.engine import Worker
from qserve.worker.handler import demo, load_handler

from ..helpers.process import ServerProcess
from ..helpers.sdk import client, collect, wait_for

REPO = Path(__file__).resolve().parents[2]


class WorkerProcess:
    """A `python -m qserve worker` child; its stderr lines are kept and can be waited on."""

    def __init__(self, server: ServerProcess, service: str, handler: str, *extra: str) -> None:
        args = [sys.executable, "-m", "qserve", "worker", "--url", f"{server.url}/api/predict/{service}",
                "--token", server.token, "--handler", handler, *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
        self.proc = subprocess.Popen(args, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     text=True, env=env)
        self.lines: list[str] = []
        self._fresh: queue.Queue[str | None] = queue.Queue()
        self._ended = threading.Event()   # the reader took the last line
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            self._fresh.put(line)
        self._fresh.put(None)
        self._ended.set()

    def drained(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until `lines` holds the exited worker's last line (the reader may lag)."""
        self._ended.wait(timeout)

    def wait_line(self, needle: str, timeout: float = 15.0) -> str:
        """The next stderr line containing `needle` (bounded wait on the pipe, no polling)."""
        while True:
            try:
                line = self._fresh.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {needle!r} within {timeout}s:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"worker exited before {needle!r}:\n" + "\n".join(self.lines))
            if needle in line:
                return line.rstrip("\n")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout)
        self.drained()
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def workers():
    started: list[WorkerProcess] = []

    def start(*args) -> WorkerProcess:
        w = WorkerProcess(*args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.kill()


def result_of(sink, rid: str, timeout: float = 15.0):
    """The sink entry for `rid`, long-polling (each get waits on the server) for at most `timeout`."""
    found = []
    wait_for(lambda: found.extend(sink.get(request_id=rid, auto_delete=False, timeout="2s")) or found,
             timeout)
    assert found, f"no result for {rid}"
    return found[0]


# ----------------------------------------------------------------------------- end to end

def test_demo_worker_end_to_end(server, service, workers):
    q, sink = client(server, service), client(server, service + "/sink")
    rids = [q.put(f"input {i}".encode(), tags={"n": str(i)})[1] for i in range(100)]
    inputs = {df.tags["requestId"]: df for df in q.get(length=100, auto_delete=False, timeout="0s")}
    assert sorted(inputs) == sorted(rids)

    w = workers(server, service, "demo", "--concurrency", "4", "--summary-seconds", "0.3")
    watcher = sink.watch(0, 200, auto_commit=False)     # window > 100: nothing is committed, results stay
    got = collect(watcher, 100)
    watcher.close()
    assert sorted(df.tags["requestId"] for df in got) == sorted(rids)

    for rid in rids:
        [df] = sink.get(request_id=rid, auto_delete=False, timeout="0s")
        assert df.tags["requestId"] == rid
        assert df.tags["ts@source"] == inputs[rid].tags["ts@source"] and "ts@sink" in df.tags
        assert "lastCode" not in df.tags and df.tags["Header:Content-Type"] == "application/json"
        [probs] = json.loads(df.data)
        assert set(probs) == {"p_0", "p_1"} and abs(probs["p_0"] + probs["p_1"] - 1) < 1e-9
        assert probs == demo(inputs[rid].data, {})[0]
    assert wait_for(lambda: q.attributes()["stream.length"] == "0")
    assert sink.attributes()["stream.length"] == "100"          # one result each, no duplicates
    w.wait_line(": processed 100, failed 0, retried 0")       # the periodic summary line
    assert w.stop() == 0
    assert any("processed 100, failed 0" in line for line in w.lines)


def test_handler_errors_and_retries(server, service, workers):
    q, sink = client(server, service), client(server, service + "/sink")
    rid = {mode: q.put(mode.encode(), tags={"mode": mode})[1] for mode in ("fail", "coded", "retry", "echo", "huge")}
    w = workers(server, service, "tests.helpers.handlers:dispatch", "--concurrency", "2")

    failed = result_of(sink, rid["fail"])
    assert failed.tags["lastCode"] == "500"
    assert failed.tags["lastReason"] == "ValueError: cannot handle fail"       # one line
    assert failed.data.decode().startswith("ValueError: cannot handle fail\nsecond line")
    coded = result_of(sink, rid["coded"])
    assert (coded.tags["lastCode"], coded.tags["lastReason"]) == ("503", "Unavailable: model offline")
    # Retryable: nacked, redelivered with lastCode/lastReason, then it succeeds; no result for the failed try
    retried = result_of(sink, rid["retry"])
    assert "lastCode" not in retried.tags
    assert json.loads(retried.data) == {"lastCode": "Warmup", "lastReason": "warming up", "data": "retry"}
    assert result_of(sink, rid["echo"]).data == b"ECHO"
    # a result the sink refuses (413) is replaced by an error result, so the requester gets an answer
    huge = result_of(sink, rid["huge"])
    assert huge.tags["lastCode"] == "413" and huge.tags["lastReason"].startswith("result refused by the sink: 413")
    assert wait_for(lambda: q.attributes()["stream.length"] == "0")
    assert sink.attributes()["stream.length"] == "5"
    assert w.stop() == 0
    assert any("WARNING" in line and "ValueError: cannot handle fail" in line for line in w.lines)
    assert any("processed 5, failed 3, retried 1" in line for line in w.lines)


def test_sigterm_drains_and_loses_nothing(server, service, workers, tmp_path):
    q, sink = client(server, service), client(server, service + "/sink")
    gate = str(tmp_path / "gate")
    gate_listener, never_listener = closed_gate(gate), closed_gate(gate + ".never")
    modes = ["gate", "gate", "stuck", "gate", "gate", "gate"]
    rids = [q.put(f"job {i}".encode(), tags={"mode": m, "gate": gate})[1] for i, m in enumerate(modes)]
    w = workers(server, service, "tests.helpers.handlers:dispatch", "--concurrency", "3", "--drain-seconds", "1.5")
    started = {w.wait_line("HANDLER-STARTED").split()[-1] for _ in range(3)}
    assert started == set(rids[:3])              # two gated handlers and the stuck one are running

    w.proc.send_signal(signal.SIGTERM)
    w.wait_line("draining: 3 running")
    gate_listener.close()                        # the gated ones finish during the drain
    assert w.proc.wait(15) == 0
    w.drained()
    assert any("cancelling 1 handlers" in line for line in w.lines)

    # nothing lost: each input either has its result in the sink and is gone, or is still queued
    done = [r for r in rids if sink.get(request_id=r, auto_delete=False, timeout="0s")]
    queued = [r for r in rids if q.get(request_id=r, auto_delete=False, timeout="0s")]
    assert sorted(done + queued) == sorted(rids) and not set(done) & set(queued)
    assert set(rids[:2]) <= set(done) and rids[2] in queued
    [stuck] = q.get(request_id=rids[2], auto_delete=False, timeout="0s")
    assert stuck.tags["lastCode"] == "Shutdown"  # the unfinished one was negatively committed

    # a second worker picks up everything left, the stuck entry included
    w2 = workers(server, service, "tests.helpers.handlers:dispatch", "--concurrency", "3")
    for r in queued:
        result_of(sink, r)
    assert result_of(sink, rids[2]).data == b"redone after Shutdown"
    assert wait_for(lambda: q.attributes()["stream.length"] == "0")
    assert sink.attributes()["stream.length"] == "6"
    assert w2.stop() == 0
    never_listener.close()


def closed_gate(path: str) -> socket.socket:
    """A gate for handlers.py's blocking modes: closed while this listener is open."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(16)
    return listener


def test_serve_with_embedded_worker(tmp_path):
    srv = ServerProcess(tmp_path / "data", "--worker", "demo", "--root-service", "emb").start()
    try:
        q, sink = client(srv, "emb"), client(srv, "emb/sink")
        _, rid = q.put(b"hello")
        result = result_of(sink, rid)
        assert json.loads(result.data) == demo(b"hello", {})
        assert wait_for(lambda: q.attributes()["stream.length"] == "0")
    finally:
        assert srv.stop() == 0
    assert any(f"embedded worker: handler demo on http://127.0.0.1:{srv.port}/api/predict/emb" in line
               for line in srv.lines)
    assert any("stopped; all queues synced and closed" in line for line in srv.lines)


# --------------------------------------------------------------------------- in process

async def test_in_process_async_handler_and_drain(server, service):
    url = f"{server.url}/api/predict/{service}"
    with trio.fail_after(20):
        async with QueueClient(url, token=server.token) as producer, \
                QueueClient(url, token=server.token, group=service) as consumer:
            sink = producer.sink()
            rids = [(await producer.put(b"x" * i))[1] for i in range(1, 6)]
            worker = Worker(consumer, load_handler("tests.helpers.handlers:async_length"), concurrency=2)
            async with trio.open_nursery() as nursery:
                await nursery.start(worker.run)
                for i, rid in enumerate(rids, start=1):
                    [entry] = await sink.get(request_id=rid, auto_delete=False, timeout=5)
                    assert json.loads(entry.data) == {"length": i, "requestId": rid}
                worker.drain()
            stats = worker.statistics()
            assert (stats["processed"], stats["failed"], stats["in_hand"]) == (5, 0, 0)
            assert (await producer.attributes())["stream.length"] == "0"   # run() returns after the commits
            await sink.aclose()


# ------------------------------------------------------------------ start-up failures (#13)

def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LogLines(logging.Handler):
    """The `qserve.worker` log lines of an in-process worker; a trio task can wait for one (the
    worker logs from the trio thread, so `emit` may wake trio tasks directly)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._changed = trio.lowlevel.ParkingLot()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")
        self._changed.unpark_all()

    async def wait_for(self, needle: str) -> str:
        while True:
            for line in self.lines:
                if needle in line:
                    return line
            await self._changed.park()


@pytest.fixture
def worker_log():
    handler = LogLines()
    logger = logging.getLogger("qserve.worker")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


async def test_worker_waits_for_a_server_started_later(tmp_path, worker_log):
    """No server yet: one WARNING line per attempt, the wait doubling up to its cap and no
    "watching" line; the server comes up on that port later and the worker serves it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/predict/late"
    srv = ServerProcess(tmp_path / "data", "--port", str(port))
    with trio.fail_after(40):
        async with QueueClient(url, token=srv.token, group="late") as consumer:
            worker = Worker(consumer, load_handler("demo"), connect_delay=0.05, connect_delay_max=0.2)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(worker.run)
                    await worker_log.wait_for("retrying in 0.2s")        # the cap: 0.05, 0.1, 0.2
                    first = next(l for l in worker_log.lines if "cannot reach" in l)
                    assert first == (f"WARNING cannot reach http://127.0.0.1:{port}: connection refused; "
                                     "retrying in 0.05s")
                    await trio.to_thread.run_sync(srv.start)
                    await worker_log.wait_for("watching")
                    async with QueueClient(url, token=srv.token) as producer:
                        _, rid = await producer.put(b"hello")
                        async with producer.sink() as sink:
                            [result] = await sink.get(request_id=rid, auto_delete=False, timeout=10)
                    assert json.loads(result.data) == demo(b"hello", {})
                    worker.drain()             # run() returns once the input is committed
            finally:
                if srv.proc is not None:
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(srv.stop)
    lines = worker_log.lines
    attempts = [l for l in lines if "cannot reach" in l]
    assert all(l.startswith("WARNING ") for l in attempts)
    delays = [float(l.rsplit(" ", 1)[1].rstrip("s")) for l in attempts]
    assert delays == [min(0.05 * 2 ** k, 0.2) for k in range(len(delays))]
    watching = [k for k, l in enumerate(lines) if " watching " in l]
    assert len(watching) == 1 and watching[0] > lines.index(attempts[-1])
    assert worker.statistics()["processed"] == 1


async def test_drain_before_the_server_is_reached(worker_log):
    """SIGTERM (a drain) while the worker still waits for its server: it stops at once."""
    url = f"http://127.0.0.1:{free_port()}/api/predict/never"
    with trio.fail_after(20):
        async with QueueClient(url, group="never") as consumer:
            worker = Worker(consumer, load_handler("demo"), connect_delay=5.0)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(worker.run)
                await worker_log.wait_for("retrying in 5s")
                worker.drain()
    assert any("stopped before the server accepted the subscription" in l for l in worker_log.lines)
    assert not any(" watching " in l for l in worker_log.lines)


def test_cli_worker_without_a_server(workers):
    """The real command against a port nobody listens on: one WARNING line, no traceback, and
    SIGTERM stops it cleanly."""
    port = free_port()
    nowhere = types.SimpleNamespace(url=f"http://127.0.0.1:{port}", token="t")
    w = workers(nowhere, "svc", "demo")
    line = w.wait_line("cannot reach")
    assert line.endswith(f" WARNING qserve.worker: cannot reach http://127.0.0.1:{port}: connection refused; "
                         "retrying in 1s")
    assert w.stop() == 0
    assert not any("watching" in l or "Traceback" in l for l in w.lines)


async def test_worker_waits_while_its_queue_is_fenced(tmp_path, worker_log):
    """The server is up but cannot open the queue (this test holds its directory, as a running
    `qserve log repair` would): the worker says why in its WARNING lines and subscribes once the
    queue is free."""
    from qserve.storage import LogConfig, QueueLog

    srv = ServerProcess(tmp_path / "data")
    held = QueueLog.open(tmp_path / "data" / "fenced" / "input", LogConfig())
    try:
        await trio.to_thread.run_sync(srv.start)
        url = f"{srv.url}/api/predict/fenced"
        with trio.fail_after(40):
            async with QueueClient(url, token=srv.token, group="fenced") as consumer:
                worker = Worker(consumer, load_handler("demo"), connect_delay=0.05, connect_delay_max=0.2)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(worker.run)
                    line = await worker_log.wait_for("cannot subscribe")
                    assert line.startswith(f"WARNING cannot subscribe to {url}: queue fenced is fenced: ")
                    assert f"in use by process {os.getpid()}" in line and line.endswith("; retrying in 0.05s")
                    assert not any(" watching " in l for l in worker_log.lines)
                    held.close()
                    await worker_log.wait_for(" watching ")
                    async with QueueClient(url, token=srv.token) as producer:
                        _, rid = await producer.put(b"after the fence")
                        async with producer.sink() as sink:
                            [result] = await sink.get(request_id=rid, auto_delete=False, timeout=10)
                    assert json.loads(result.data) == demo(b"after the fence", {})
                    worker.drain()
    finally:
        held.close()
        if srv.proc is not None:
            await trio.to_thread.run_sync(srv.stop)
    assert worker.statistics()["processed"] == 1
