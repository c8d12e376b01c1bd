"""Raw HTTP against a real server: every operation and parameter, and every kind of bad input; on
every queue backend (local and Redis: the `server` fixture below).

Each bad request gets its status and a one-line reason, the queue is unchanged afterwards, and the
server keeps serving.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading

import pytest

from qserve.wire import protobuf

PROTO = "application/vnd.google.protobuf"


@pytest.fixture
def server(backend_server):
    """The session's server on the backend under test: this module runs on every backend."""
    return backend_server


class Raw:
    def __init__(self, server, service):
        self.server, self.service = server, service
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)

    def path(self, sub=""):
        return f"/api/predict/{self.service}{sub}"

    def __call__(self, method, query="", body=None, headers=None, sub="", auth=True):
        h = {"Authorization": self.server.token} if auth else {}
        h.update(headers or {})
        target = self.path(sub) + (("?" + query) if query else "")
        self.conn.request(method, target, body=body, headers=h)
        resp = self.conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()

    def attrs(self):
        status, _, body = self("GET", "_attrs_=true")
        assert status == 200
        return json.loads(body)

    def length(self):
        return int(self.attrs()["stream.length"])


@pytest.fixture
def raw(server, service):
    r = Raw(server, service)
    yield r
    r.conn.close()


def test_put_answers_bare_index_and_request_id(raw):
    status, headers, body = raw("POST", "a=1&b=2", b"payload", {"Content-Type": "text/plain", "X-EAS-Trace": "t1"})
    assert status == 200 and body == b"1"
    rid = headers["X-Eas-Queueservice-Request-Id"]
    status, _, body = raw("GET", "_index_=1&_raw_=false&_auto_delete_=false")
    [entry] = json.loads(body)
    assert entry["index"] == 1 and base64.b64decode(entry["data"]) == b"payload"
    assert entry["tags"]["a"] == "1" and entry["tags"]["requestId"] == rid
    assert entry["tags"]["Header:Content-Type"] == "text/plain" and entry["tags"]["Header:X-Eas-Trace"] == "t1"
    assert "Header:Authorization" not in entry["tags"]


def test_client_request_id_is_honoured(raw):
    status, headers, _ = raw("POST", "requestId=mine-1", b"x")
    assert status == 200 and headers["X-Eas-Queueservice-Request-Id"] == "mine-1"
    status, _, body = raw("GET", "requestId=mine-1&_auto_delete_=false")
    assert status == 200 and body == b"x"


def test_raw_get_returns_payload_with_its_content_type_and_first_entry_only(raw):
    raw("POST", "", b'{"a": 1}', {"Content-Type": "application/json"})
    raw("POST", "", b"second")
    status, headers, body = raw("GET", "_length_=5")
    assert status == 200 and body == b'{"a": 1}' and headers["Content-Type"] == "application/json"
    assert raw.length() == 1   # only the first was auto-deleted


def test_protobuf_get_and_attributes(raw):
    raw("POST", "k=v", b"d1")
    raw("POST", "", b"d2")
    status, headers, body = raw("GET", "_length_=2&_raw_=false&_auto_delete_=false", headers={"Accept": PROTO})
    assert status == 200 and headers["Content-Type"] == PROTO
    frames = protobuf.decode_frame_list(body)
    assert [(f.index, f.data) for f in frames] == [(1, b"d1"), (2, b"d2")] and frames[0].tags["k"] == "v"
    status, _, body = raw("GET", "_attrs_=true", headers={"Accept": PROTO})
    attrs = protobuf.decode_attributes(body)
    assert attrs["stream.length"] == "2" and attrs["meta.header.user"] == "X-EAS-QueueService-Uid"


def test_get_nothing_is_204_without_body(raw):
    status, headers, body = raw("GET", "_raw_=false")
    assert status == 204 and body == b""


def test_get_filters_by_tags_and_start_index(raw):
    for i in range(6):
        raw("POST", f"color={'red' if i % 2 else 'blue'}&_priority_={i % 3}", str(i).encode())
    status, _, body = raw("GET", "color=red&_index_=3&_length_=5&_raw_=false&_auto_delete_=false")
    assert [base64.b64decode(e["data"]) for e in json.loads(body)] == [b"3", b"5"]   # index order
    # auto-deleting gets with the same filter: each entry once, then nothing; others untouched
    got = [raw("GET", "color=red")[2] for _ in range(4)]
    assert got == [b"1", b"3", b"5", b""] and raw.length() == 3
    raw("POST", "color=red", b"6")
    assert raw("GET", "color=red&_index_=0")[2] == b"6"
    assert raw("GET", "_count_=true&color=blue")[2] == b"3"
    assert raw("GET", "_count_=true&color=blue&_priority_=2")[2] == b"1"   # only entry 2 ("2")


def test_delete_truncate_and_idempotence(raw):
    for i in range(5):
        raw("POST", "", b"x")
    assert raw("DELETE", "_index_=2")[0] == 200
    assert raw("DELETE", "_indexes_=3,4,999")[0] == 200
    assert raw("DELETE", "_indexes_=3")[0] == 200        # again: harmless
    assert raw("DELETE", "_index_=0")[0] == 200
    assert raw.length() == 2
    assert raw("DELETE", "_index_=5&_trunc_=true")[:3:2] == (200, b"OK")
    attrs = raw.attrs()
    assert (attrs["stream.length"], attrs["stream.firstEntry"], attrs["stream.lastEntry"]) == ("1", "5", "5")
    raw("DELETE", "_index_=100&_trunc_=true")
    attrs = raw.attrs()
    assert (attrs["stream.length"], attrs["stream.firstEntry"], attrs["stream.lastEntry"]) == ("0", "0", "0")
    assert raw("POST", "", b"y")[2] == b"6"


def test_count_with_priority_and_tags(raw):
    raw("POST", "_priority_=1&t=a", b"x")
    raw("POST", "t=a", b"x")
    raw("POST", "", b"x", {"X-EAS-QueueService-Priority": "1"})
    assert raw("GET", "_count_=true")[2] == b"3"
    assert raw("GET", "_count_=true&_priority_=1")[2] == b"2"
    assert raw("GET", "_count_=true&t=a")[2] == b"2"


def test_end_refuses_puts_and_force_truncates(raw):
    raw("POST", "", b"x")
    assert raw("POST", "_eos_=true")[0] == 200
    status, _, body = raw("POST", "", b"late")
    assert status == 409 and body.count(b"\n") == 1
    assert raw.attrs()["meta.state"] == "End" and raw.length() == 1
    assert raw("POST", "_eos_=true&_force_=true")[0] == 200
    assert raw.length() == 0


def test_search_unknown_is_empty_object(raw):
    assert raw("GET", "_search_=true&_index_=42")[2] == b"{}"


def test_custom_subpath_put(raw):
    status, _, body = raw("POST", "", b"x", sub="/videox_fun/infer_forward")
    assert status == 200
    status, _, body = raw("GET", "_raw_=false&_auto_delete_=false")
    assert json.loads(body)[0]["tags"]["_path_"] == "videox_fun/infer_forward"


@pytest.mark.parametrize("method,query,body,headers,status", [
    ("GET", "_length_=abc", None, {}, 400),
    ("GET", "_length_=0", None, {}, 400),
    ("GET", "_timeout_=-1s", None, {}, 400),
    ("GET", "_timeout_=later", None, {}, 400),
    ("GET", "_auto_delete_=perhaps", None, {}, 400),
    ("GET", "_index_=-5", None, {}, 400),
    ("POST", "_priority_=high", b"x", {}, 400),
    ("POST", "_priority_=-1", b"x", {}, 400),
    ("DELETE", "", None, {}, 400),
    ("DELETE", "_indexes_=1,x", None, {}, 400),
    ("PUT", "", None, {}, 400),
    ("PATCH", "", b"x", {}, 405),
    ("POST", "", b"x", {"Authorization": "wrong"}, 401),
    ("GET", "_watch_=true&_window_=0", None, {}, 400),
])
def test_bad_requests_get_their_status_and_change_nothing(raw, method, query, body, headers, status):
    raw("POST", "", b"keep")
    before = raw.attrs()
    got, resp_headers, reason = raw(method, query, body, headers)
    assert got == status
    assert reason.endswith(b"\n") and reason.count(b"\n") == 1 and len(reason) < 200
    if status == 405:
        assert resp_headers["Allow"] == "GET, POST, PUT, DELETE"
    after = raw.attrs()
    assert {k: after[k] for k in ("stream.length", "stream.lastEntry")} == \
        {k: before[k] for k in ("stream.length", "stream.lastEntry")}


def test_missing_token_and_unknown_path(raw, server):
    assert raw("GET", "", auth=False)[0] == 401
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/nowhere", headers={"Authorization": server.token})
    assert conn.getresponse().status == 404
    conn.close()


def test_oversized_body_refused_before_it_is_read(raw, server):
    raw("POST", "", b"keep")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST {raw.path()} HTTP/1.1\r\nHost: x\r\nAuthorization: {server.token}\r\n"
                  f"Content-Length: {10**9}\r\n\r\n".encode())
        head = s.recv(4096)
    assert head.startswith(b"HTTP/1.1 413")
    assert raw.length() == 1


def test_garbage_and_client_stopping_mid_body(raw, server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"POST {raw.path()} HTTP/1.1\r\nHost: x\r\nAuthorization: {server.token}\r\n"
                  f"Content-Length: 100\r\n\r\nonly part".encode())
    assert raw.length() == 0
    assert raw("POST", "", b"still serving")[0] == 200


def test_oversized_headers_get_431(raw, server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(f"GET {raw.path()} HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 40000}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 431")


def test_racing_auto_delete_gets_return_each_entry_once(raw, server):
    n = 40
    for i in range(n):
        raw("POST", "", str(i).encode())
    seen: list[bytes] = []
    lock = threading.Lock()

    def getter():
        r = Raw(server, raw.service)
        while True:
            status, _, body = r("GET", "_timeout_=0")
            if status == 204:
                break
            with lock:
                seen.append(body)
        r.conn.close()

    threads = [threading.Thread(target=getter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(seen, key=int) == [str(i).encode() for i in range(n)]
