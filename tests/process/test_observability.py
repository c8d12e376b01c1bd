"""Operating a real `qserve serve` process: /metrics as a Prometheus scraper reads it, /readyz and
/healthz as a load balancer asks them, `--log-format json` lines a log pipeline parses, and the
access log (only with `--access-log`); on both queue backends."""

from __future__ import annotations

import http.client
import json

from prometheus_client.parser import text_string_to_metric_families

from ..helpers.process import ServerProcess, backend_args

TIMEOUT = 10.0


def request(srv: ServerProcess, method: str, path: str, body: bytes = b"", token: str | None = None):
    """One HTTP request on a connection of its own: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body, {"Authorization": token} if token is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def samples(text: str) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_readiness_and_json_logs_of_a_real_server(tmp_path, backend_url, service):
    srv = ServerProcess(tmp_path / "data", *backend_args(backend_url), "--log-format", "json", "--access-log",
                        "--metrics-token", "scrape-token").start()
    try:
        for i in range(3):
            assert request(srv, "POST", f"/api/predict/{service}", f"e{i}".encode(), srv.token)[0] == 200
        assert request(srv, "GET", "/readyz") == (200, b"ready\n")
        assert request(srv, "GET", "/healthz") == (200, b"OK")
        assert request(srv, "GET", "/metrics", token="wrong")[0] == 401
        status, body = request(srv, "GET", "/metrics", token="scrape-token")
        assert status == 200
        found = samples(body.decode())
        labels = frozenset({"service": service, "queue": "input"}.items())
        assert found["qserve_puts_total", labels] == 3
        assert found["qserve_queue_length", labels] == 3
        assert found["qserve_put_seconds_count", frozenset()] >= 3
        assert found["qserve_ready", frozenset()] == 1
        assert found["process_resident_memory_bytes", frozenset()] > 0
        assert found["qserve_requests_total", frozenset({"operation": "put", "status": "200"}.items())] == 3
    finally:
        assert srv.stop() == 0
    records = [json.loads(line) for line in srv.lines]   # every line is one JSON object
    assert all({"time", "level", "logger", "event"} <= record.keys() for record in records)
    assert any(r["event"].startswith("qserve listening on http://127.0.0.1:") for r in records)
    access = [r for r in records if r["logger"] == "qserve.access"]
    puts = [r for r in access if r["method"] == "POST"]
    assert [(r["path"], r["status"], r["bytes"]) for r in puts] == [(f"/api/predict/{service}", 200, 1)] * 3
    assert all(isinstance(r["duration"], float) and r["duration"] >= 0 for r in access)
    assert {(r["path"], r["status"]) for r in access if r["method"] == "GET"} == {
        ("/readyz", 200), ("/healthz", 200), ("/metrics", 401), ("/metrics", 200)}
    assert not any(token in line for line in srv.lines for token in (srv.token, "scrape-token"))


def test_no_access_log_unless_asked(backend_server, service):
    srv = backend_server   # the session's server, started without --access-log
    assert request(srv, "POST", f"/api/predict/{service}", b"x", srv.token)[0] == 200
    assert request(srv, "GET", f"/api/predict/{service}?_index_=1", token=srv.token)[0] == 200
    assert request(srv, "GET", "/readyz") == (200, b"ready\n")
    assert not [line for line in srv.lines if "qserve.access" in line]
