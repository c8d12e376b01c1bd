"""`GET /metrics`, `/metrics?format=json`, `/readyz` and the access log, on a real server in process
(memory streams, trio's clock), on every queue backend where a queue is involved.

The exposition is parsed with prometheus-client's own parser, and each figure a test changes (a put,
a get, a commit, a negative commit and the redelivery it causes, a delete, a truncation) is asserted
to move by exactly that amount between two scrapes.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys

import pytest
import trio
import trio.testing
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from qserve.core.events import QueueRef
from qserve.backends.local import commit
from qserve.backends.local.queues import queue_dir
from qserve.cli import main as cli_main
from qserve.server.health import reporting_progress
from qserve.server.logs import JsonFormatter
from qserve.server.metrics import RENDER_EVERY

from ..helpers.inproc import TOKEN, next_frame, no_frame, running_server
from ..helpers.queue_files import ENTRIES, build_queue, damage_sealed_segment

LIMIT = 60


@pytest.fixture
def slow_clock():
    """trio's autojump clock, jumping only after 0.25 s of real idleness: a queue opened from disk
    recovers in a worker thread, and waiting for it must not let the clock jump to the test's limit."""
    return trio.testing.MockClock(autojump_threshold=0.25)


async def scrape(srv, token: str = TOKEN, query: str = "", *, fresh: bool = True) -> tuple[int, str, dict]:
    """GET /metrics: (status, body, {(sample name, frozen labels): value}); ``fresh``: first let
    the last rendering age past `RENDER_EVERY` (instant on trio's autojump clock)."""
    if fresh:
        await trio.sleep(RENDER_EVERY)
    client = await srv.client("unused")
    head, body = await client.request("GET", "/metrics" + query, headers=[("Authorization", token)])
    text = body.decode()
    samples = {}
    if head.status_code == 200 and not query:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return head.status_code, text, samples


def queue_labels(service: str, queue: str = "input") -> frozenset:
    return frozenset({"service": service, "queue": queue}.items())


def value(samples: dict, name: str, labels: frozenset = frozenset()) -> float:
    return samples.get((name, labels), 0.0)


def moved(before: dict, after: dict, service: str) -> dict[str, float]:
    """How much each per-queue counter of ``service``'s input queue moved between two scrapes."""
    labels = queue_labels(service)
    names = ("puts", "gets", "deliveries", "redeliveries", "commits", "negatives", "deletes", "truncates")
    return {name: value(after, f"qserve_{name}_total", labels) - value(before, f"qserve_{name}_total", labels)
            for name in names}


async def test_each_operation_moves_its_counter_by_exactly_its_amount(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("m")
            _, _, start = await scrape(srv)
            for i in range(5):
                assert (await c.call("POST", body=f"e{i}".encode()))[0] == 200
            _, _, after_puts = await scrape(srv)
            assert moved(start, after_puts, "m") == {**dict.fromkeys(moved(start, start, "m"), 0), "puts": 5}
            assert value(after_puts, "qserve_queue_length", queue_labels("m")) == 5
            assert value(after_puts, "qserve_queue_first_index", queue_labels("m")) == 1
            assert value(after_puts, "qserve_queue_last_index", queue_labels("m")) == 5
            assert value(after_puts, "qserve_put_seconds_count") - value(start, "qserve_put_seconds_count") == 5
            assert value(after_puts, "qserve_requests_total",
                         frozenset({"operation": "put", "status": "200"}.items())) == 5

            # a watcher takes two (window 2), commits one, nacks the other: it comes back once
            ws = await srv.watch(nursery, "m", "_window_=2", user="a")
            first, second = await next_frame(ws), await next_frame(ws)
            assert await no_frame(ws, 1)
            assert (await c.call("PUT", f"_indexes_={first.index}"))[0] == 200
            third = await next_frame(ws)   # the committed one's slot
            assert (await c.call("PUT", f"_indexes_={second.index}&_negative_=true", b"_code_=500"))[0] == 200
            again = await next_frame(ws)
            assert again.index == second.index
            _, _, after_watch = await scrape(srv)
            assert moved(after_puts, after_watch, "m") == {**dict.fromkeys(moved(start, start, "m"), 0),
                                                            "deliveries": 4, "redeliveries": 1, "commits": 1,
                                                            "negatives": 1}
            assert value(after_watch, "qserve_queue_pending", queue_labels("m")) == 2
            assert value(after_watch, "qserve_group_pending",
                         frozenset({"service": "m", "queue": "input", "group": "g"}.items())) == 2
            assert value(after_watch, "qserve_queue_consumers", queue_labels("m")) == 1
            assert value(after_watch, "qserve_watch_sessions") == 1
            assert value(after_watch, "qserve_websockets_open") == 1
            # the three first deliveries were timed from their put
            assert (value(after_watch, "qserve_put_to_delivery_seconds_count")
                    - value(after_puts, "qserve_put_to_delivery_seconds_count")) == 3
            await ws.aclose()
            await trio.testing.wait_all_tasks_blocked()

            # a get of 1 (deleting it), a delete of 2 (one of them unknown), a truncation
            assert (await c.call("GET", f"_index_={again.index}&_length_=1"))[0] == 200
            assert (await c.call("DELETE", f"_indexes_={third.index},999"))[0] == 200
            assert (await c.call("DELETE", "_trunc_=true&_index_=5"))[0] == 200
            _, _, after_rest = await scrape(srv)
            assert moved(after_watch, after_rest, "m") == {**dict.fromkeys(moved(start, start, "m"), 0),
                                                           "gets": 1, "deletes": 2, "truncates": 1}
            assert value(after_rest, "qserve_queue_length", queue_labels("m")) == 1
            assert value(after_rest, "qserve_requests_total",
                         frozenset({"operation": "watch", "status": "101"}.items())) == 1
            nursery.cancel_scope.cancel()


async def test_a_consumer_gone_gives_redeliveries_and_auto_commit_none(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("r")
            for i in range(3):
                await c.call("POST", body=b"x")
            a = await srv.watch(nursery, "r", "_window_=3", user="a")
            held = {(await next_frame(a)).index for _ in range(3)}
            _, _, before = await scrape(srv)
            await a._stream.aclose()   # gone: its three entries go back to the group
            b = await srv.watch(nursery, "r", "_window_=3&_auto_commit_=true", user="b")
            assert {(await next_frame(b)).index for _ in range(3)} == held
            for i in range(2):
                await c.call("POST", body=b"y")
            assert len({(await next_frame(b)).index for _ in range(2)}) == 2
            _, _, after = await scrape(srv)
            assert moved(before, after, "r")["deliveries"] == 5
            assert moved(before, after, "r")["redeliveries"] == 3
            assert value(after, "qserve_queue_length", queue_labels("r")) == 0
            nursery.cancel_scope.cancel()


async def test_metrics_token_and_the_rendering_reused_for_a_quarter_second(tmp_path, slow_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path) as srv:
            assert (await scrape(srv, token="wrong"))[0] == 401
            assert (await scrape(srv, token=""))[0] == 401
            status, text, samples = await scrape(srv)
            assert status == 200 and "# TYPE qserve_put_seconds histogram" in text
            assert value(samples, "qserve_ready") == 1
            assert value(samples, "process_open_fds") > 0   # the process collector, on our registry
            await (await srv.client("p")).call("POST", body=b"1")
            assert (await scrape(srv, fresh=False))[1] == text   # within RENDER_EVERY: the same bytes
            _, _, samples = await scrape(srv)
            assert value(samples, "qserve_puts_total", queue_labels("p")) == 1
        async with running_server(tmp_path, metrics_token="scraper") as srv:
            assert (await scrape(srv, token="scraper"))[0] == 200
            assert (await scrape(srv, token=TOKEN))[0] == 200   # the API's own token still opens it
            assert (await scrape(srv, token="wrong"))[0] == 401
            c = await srv.client("q")
            head, _ = await c.request("GET", "/api/predict/q", headers=[("Authorization", "scraper")])
            assert head.status_code == 401   # the scraper's token opens no queue


async def test_openmetrics_is_negotiated_and_json_has_the_same_figures(tmp_path, backend, autojump_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, **backend) as srv, trio.open_nursery() as nursery:
            c = await srv.client("j")
            for _ in range(3):
                await c.call("POST", body=b"z")
            ws = await srv.watch(nursery, "j", "_window_=1", user="u", group="grp")
            await next_frame(ws)
            client = await srv.client("unused")
            head, body = await client.request("GET", "/metrics", headers=[
                ("Authorization", TOKEN), ("Accept", "application/openmetrics-text; version=1.0.0")])
            assert head.status_code == 200 and body.endswith(b"# EOF\n") and body.count(b"# EOF") == 1
            families = {f.name: f for f in openmetrics_families(body.decode())}   # the strict parser
            assert [s.value for s in families["qserve_puts"].samples
                    if s.labels == {"service": "j", "queue": "input"}] == [3]
            assert dict(head.headers)[b"content-type"].startswith(b"application/openmetrics-text")
            status, text, _ = await scrape(srv, query="?format=json")
            doc = json.loads(text)
            assert status == 200 and doc["ready"] is True and doc["not_ready"] is None
            queue = next(q for q in doc["queues"] if q["service"] == "j" and q["queue"] == "input")
            assert (queue["length"], queue["pending"], queue["consumers"]) == (3, 1, 1)
            assert queue["counters"]["puts"] == 3 and queue["counters"]["deliveries"] == 1
            assert [g["name"] for g in queue["groups"]] == ["grp"] and queue["groups"][0]["pending"] == 1
            [consumer] = queue["consumer_list"]
            assert (consumer["id"], consumer["group"], consumer["window"], consumer["pending"]) == ("grp.u", "grp", 1, 1)
            assert doc["server"]["watch_sessions"] == 1 and doc["latency"]["put"]["count"] == 3
            assert (await scrape(srv, query="?format=xml"))[0] == 400
            nursery.cancel_scope.cancel()


async def test_local_queue_disk_figures_and_start_up(tmp_path, slow_clock):
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path) as srv:
            c = await srv.client("d")
            await c.call("POST", body=b"0123456789")
        async with running_server(tmp_path) as srv:   # opened from disk at start
            _, _, samples = await scrape(srv)
            assert value(samples, "qserve_queue_disk_bytes", queue_labels("d")) > 10
            assert value(samples, "qserve_queue_segments", queue_labels("d")) >= 1
            assert value(samples, "qserve_recovered_entries") == 1
            assert ("qserve_recovery_seconds", frozenset()) in samples


ROUNDS = "qserve_fsync_round_seconds"


def bucket(samples: dict, service: str, le: str) -> float:
    """The rounds of ``service``'s input queue that took at most ``le`` seconds (cumulative)."""
    return value(samples, f"{ROUNDS}_bucket", queue_labels(service) | {("le", le)})


async def test_group_commit_rounds_writes_and_seconds_of_a_durable_queue(tmp_path, slow_clock):
    """Under ``--fsync always`` each sequential put waits for a round that makes its one record
    durable: the writes move by exactly the puts, the rounds (the histogram's count) by at least
    one and at most the puts (a round may carry a write made before it began), their seconds grow,
    and every round is under ``+Inf``. A queue under ``never`` runs no round."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv:
            c = await srv.client("g")
            await c.call("POST", body=b"first")
            _, _, before = await scrape(srv)
            for i in range(5):
                assert (await c.call("POST", body=b"x%d" % i))[0] == 200
            _, _, after = await scrape(srv)
        labels = queue_labels("g")
        names = (f"{ROUNDS}_count", f"{ROUNDS}_sum", "qserve_fsync_writes_total")
        assert all((name, labels) in before for name in names)
        delta = {name: value(after, name, labels) - value(before, name, labels) for name in names}
        assert delta["qserve_fsync_writes_total"] == 5
        assert 1 <= delta[f"{ROUNDS}_count"] <= 5
        assert delta[f"{ROUNDS}_sum"] > 0
        assert bucket(after, "g", "+Inf") == value(after, f"{ROUNDS}_count", labels)
        async with running_server(tmp_path / "never", fsync="never") as srv:
            c = await srv.client("n")
            await c.call("POST", body=b"x")
            _, _, samples = await scrape(srv)
        assert samples[f"{ROUNDS}_count", queue_labels("n")] == 0
        assert samples["qserve_fsync_writes_total", queue_labels("n")] == 0


class _StepClock:
    """`time` for the group commit: each ``perf_counter()`` is ``step`` seconds after the last, so
    every round (one reading at its start, one at its end) takes exactly ``step``."""

    def __init__(self, step: float) -> None:
        self.step, self.now = step, 0.0

    def perf_counter(self) -> float:
        self.now += self.step
        return self.now


async def test_each_round_lands_in_the_bucket_of_its_duration(tmp_path, slow_clock, monkeypatch):
    """qserve_fsync_round_seconds buckets each round by its duration: with the group commit's clock
    stepping 30 ms per reading, the rounds of three puts are counted under 0.05 s and not under
    0.025 s, and their sum grows by 30 ms a round. The buckets are the ones `commit.ROUND_BUCKETS`
    states, each a sample from the queue's first round."""
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, fsync="always") as srv:
            c = await srv.client("s")
            assert (await c.call("POST", body=b"first"))[0] == 200
            _, _, before = await scrape(srv)
            monkeypatch.setattr(commit, "time", _StepClock(0.030))
            for i in range(3):
                assert (await c.call("POST", body=b"b%d" % i))[0] == 200
            monkeypatch.undo()
            _, _, after = await scrape(srv)
    assert [le for (name, labels) in before if name == f"{ROUNDS}_bucket" and labels >= queue_labels("s")
            for key, le in labels if key == "le"] == [*map(repr, commit.ROUND_BUCKETS), "+Inf"]
    rounds = value(after, f"{ROUNDS}_count", queue_labels("s")) - value(before, f"{ROUNDS}_count", queue_labels("s"))
    assert 1 <= rounds <= 3
    assert bucket(after, "s", "0.05") - bucket(before, "s", "0.05") == rounds
    assert bucket(after, "s", "0.025") == bucket(before, "s", "0.025")
    grew = value(after, f"{ROUNDS}_sum", queue_labels("s")) - value(before, f"{ROUNDS}_sum", queue_labels("s"))
    assert grew == pytest.approx(0.030 * rounds)


async def test_readyz_is_503_with_the_reason_while_a_queue_is_fenced(tmp_path, capsys):
    data = tmp_path / "data"
    bad_dir = queue_dir(data, QueueRef("bad"))
    build_queue(bad_dir, ENTRIES)
    damage_sealed_segment(bad_dir)
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path) as srv:
            c = await srv.client("bad")
            await srv.server.recovered.wait()        # the start-up has tried every queue on disk
            head, body = await c.request("GET", "/readyz")
            assert (head.status_code, body) == (503, b"not ready: 1 queue cannot be opened (fenced; "
                                                     b"GET /api/queues and the log say why)\n")
            head, body = await c.request("GET", "/healthz")
            assert (head.status_code, body) == (200, b"OK")   # alive all the same
            _, _, samples = await scrape(srv)
            assert value(samples, "qserve_ready") == 0
            assert value(samples, "qserve_queue_fenced", queue_labels("bad")) == 1
            assert await trio.to_thread.run_sync(cli_main, ["log", "repair", str(bad_dir)]) == 0
            capsys.readouterr()
            assert (await c.call("GET", "_attrs_=true"))[0] == 200   # reopens it
            head, body = await c.request("GET", "/readyz")
            assert (head.status_code, body) == (200, b"ready\n")


async def test_readyz_is_503_when_the_data_directory_cannot_be_written(tmp_path, autojump_clock):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, data_dir=blocker / "data") as srv:
            head, body = await (await srv.client("x")).request("GET", "/readyz")
            assert (head.status_code, body.decode()) == (
                503, f"not ready: data directory {blocker / 'data'}: {blocker} is not a directory\n")


async def test_readyz_is_503_while_redis_is_down(tmp_path, fresh_redis_server):
    redis = fresh_redis_server.start()
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path, backend=redis.url) as srv:
            c = await srv.client("rd")
            assert (await c.call("POST", body=b"1"))[0] == 200
            head, body = await c.request("GET", "/readyz")
            assert (head.status_code, body) == (200, b"ready\n")
            await trio.to_thread.run_sync(redis.stop)
            head, body = await c.request("GET", "/readyz")
            assert head.status_code == 503 and body.count(b"\n") == 1, body
            assert body.startswith(b"not ready: redis at ") and b"unreachable" in body
            status, _, samples = await scrape(srv, fresh=False)   # its first: the server's own figures
            assert status == 200 and value(samples, "qserve_storage_up") == 0
            assert value(samples, "qserve_puts_total", queue_labels("rd")) == 1
            await trio.to_thread.run_sync(redis.start)
            head, body = await c.request("GET", "/readyz")
            assert (head.status_code, body) == (200, b"ready\n")


async def test_access_log_only_when_asked_and_never_the_token(tmp_path, caplog, slow_clock):
    caplog.set_level(logging.INFO)
    with trio.fail_after(LIMIT):
        async with running_server(tmp_path) as srv:
            await (await srv.client("a")).call("POST", body=b"1")
        assert not [r for r in caplog.records if r.name == "qserve.access"]
        async with running_server(tmp_path, access_log=True) as srv:
            c = await srv.client("a")
            await c.call("POST", "tag=private", b"12345")
            await c.call("GET", "_index_=99")
            await c.request("GET", "/api/predict/a", headers=[("Authorization", "wrong")])
    lines = [r for r in caplog.records if r.name == "qserve.access"]
    assert [(r.method, r.path, r.status, r.bytes) for r in lines] == [
        ("POST", "/api/predict/a", 200, 1), ("GET", "/api/predict/a", 204, 0),
        ("GET", "/api/predict/a", 401, len(b"missing or wrong token in the Authorization header\n"))]
    assert all(r.duration >= 0 for r in lines)
    text = "\n".join(r.getMessage() for r in lines)
    assert "POST /api/predict/a 200 " in text and TOKEN not in text and "private" not in text
    assert shlex.split(lines[0].getMessage())[:3] == ["POST", "/api/predict/a", "200"]


def test_a_json_log_line_is_one_object_with_the_fields_the_call_gave():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("qserve", logging.ERROR, __file__, 1, "queue %s: %s", ("q", "failed"),
                                   exc_info=sys.exc_info())
    record.queue, record.consumer, record.status = "q", "g.u", 503
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "ERROR" and doc["logger"] == "qserve" and doc["event"] == "queue q: failed"
    assert (doc["queue"], doc["consumer"], doc["status"]) == ("q", "g.u", 503)
    assert "duration" not in doc and "ValueError: boom" in doc["error"]
    assert doc["time"].endswith("+00:00")


async def test_a_long_start_up_logs_its_progress_every_ten_seconds(caplog, autojump_clock):
    caplog.set_level(logging.INFO, logger="qserve")
    opened = iter(range(1, 10))
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            with reporting_progress(nursery, lambda: next(opened)):
                await trio.sleep(25)   # the queues being opened
            await trio.sleep(30)       # done: no more lines
    assert [r.getMessage() for r in caplog.records] == [
        "starting: 1 queue opened in 10 s so far; recovering the others",
        "starting: 2 queues opened in 20 s so far; recovering the others"]
