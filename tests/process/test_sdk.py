"""The official `eas_prediction.QueueClient` against a real `qserve serve` process and a server running
in-process, on every queue backend (local and Redis: the `server` fixture below)."""

from __future__ import annotations

import pytest
from eas_prediction.exception import PredictException

from ..helpers.sdk import client


@pytest.fixture
def server(sdk_server):
    """The session's server on the backend under test, as a process and in-process: this module
    runs on every combination."""
    return sdk_server


def test_put_get_by_index_and_request_id(server, service):
    q = client(server, service)
    index, rid = q.put(b"hello", tags={"lang": "en"})
    assert index == "1" and len(rid) == 36
    [df] = q.get(index=int(index), auto_delete=False)
    assert (df.index, df.data, df.tags["lang"], df.tags["requestId"]) == (1, b"hello", "en", rid)
    assert int(df.tags["ts@source"]) > 0
    index2, rid2 = q.put(b"second")
    [df] = q.get(request_id=rid2, auto_delete=False)
    assert (df.index, df.data) == (2, b"second")
    # auto-delete (the default) returns it once
    [df] = q.get(request_id=rid2)
    assert df.index == 2
    assert q.get(request_id=rid2, timeout="0s") == []


def test_sink_queue_and_attributes(server, service):
    src = client(server, service)
    sink = client(server, service + "/sink")
    _, rid = src.put(b"x")
    sink.put(b"result", tags={"requestId": rid})
    [df] = sink.get(request_id=rid, auto_delete=False)
    assert df.data == b"result" and df.tags["requestId"] == rid and "ts@sink" in df.tags
    attrs = sink.attributes()
    assert attrs["stream.length"] == "1" and attrs["meta.name"] == service + "/sink"
    assert attrs["meta.header.user"] == "X-EAS-QueueService-Uid"
    assert all(isinstance(v, str) for v in attrs.values())
    attrs = src.attributes()
    assert (attrs["stream.firstEntry"], attrs["stream.lastEntry"], attrs["stream.length"]) == ("1", "1", "1")


def test_truncate_delete_search_commit(server, service):
    q = client(server, service)
    for i in range(5):
        q.put(f"d{i}".encode())
    assert q.delete(2) == "OK"
    assert q.delete([3, 99]) == "OK"            # unknown index: harmless
    assert q.attributes()["stream.length"] == "3"
    assert q.search(4) == {"IsPending": False, "WaitCount": 1}
    assert q.search(3) == {}
    assert q.commit(4) == b"OK"
    assert q.attributes()["stream.length"] == "2"
    last = int(q.attributes()["stream.lastEntry"])
    q.truncate(last + 1)
    attrs = q.attributes()
    assert attrs["stream.length"] == "0" and attrs["stream.firstEntry"] == "0"
    # indexes are never reused
    assert q.put(b"again")[0] == "6"


def test_long_get_returns_each_entry_once(server, service):
    q = client(server, service)
    for i in range(3):
        q.put(str(i).encode())
    got = q.get(length=10, auto_delete=True, timeout="0s")
    assert [df.data for df in got] == [b"0", b"1", b"2"]
    assert q.get(timeout="0s") == []


def test_wrong_token_is_refused(server, service):
    q = client(server, service, token="wrong")
    with pytest.raises(PredictException) as info:
        q.put(b"x")
    assert info.value.code == 401


def test_refused_put_stores_nothing_even_after_retries(server, service):
    q = client(server, service)
    q.put(b"ok")
    big = b"x" * (524288 + 1)
    with pytest.raises(PredictException) as info:
        q.put(big)
    assert info.value.code == 413
    assert q.attributes()["stream.length"] == "1"
    # exactly the limit is accepted
    assert q.put(b"y" * 524288)[0] == "2"
