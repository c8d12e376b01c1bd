"""The consumer lease and the dead-letter queue as the official `eas_prediction` SDK lives them (#17):
the SDK has no negative commit, so a worker that hangs on an entry is what these policies are for.
A real `qserve serve --delivery-timeout 1s --max-deliveries 2 --retry-backoff 1s,2,10s` on each
backend; two SDK watchers of one group that take an entry and never commit it: the lease hands it
from one to the other (``lastCode=timeout``) after the backoff, the second lease's end makes it a
dead letter, an SDK client reads it from ``S/dlq``, and the first worker's late commit is a
harmless 200 that deletes nothing."""

from __future__ import annotations

import time

import pytest

from ..helpers.process import ServerProcess, backend_args
from ..helpers.sdk import client, collect, wait_for


@pytest.fixture
def policy_server(tmp_path, backend):
    srv = ServerProcess(tmp_path / "data", "--delivery-timeout", "1s", "--max-deliveries", "2",
                        "--retry-backoff", "1s,2,10s", *backend_args(backend.get("backend"))).start()
    yield srv
    srv.kill()


def test_a_hung_sdk_worker_loses_its_lease_and_the_entry_ends_as_a_dead_letter(policy_server):
    producer = client(policy_server, "hang")
    index, request_id = producer.put(b"poison", tags={"kind": "slow"})
    index = int(index)   # the SDK answers the index as a string
    first = client(policy_server, "hang", uid="w1")
    hung = first.watch(0, 1)
    try:
        [got] = collect(hung, 1, timeout=20)
        taken = time.monotonic()
        assert int(got.index) == index and "lastCode" not in got.tags
        second = client(policy_server, "hang", uid="w2")
        other = second.watch(0, 1)
        try:
            [again] = collect(other, 1, timeout=20)   # after w1's lease ran out, and the backoff
            # the 1 s lease, then the backoff after one delivery (1 s): not before ~2 s (without the
            # backoff it came after ~1 s); a lower bound only, so a slow machine cannot fail it
            assert time.monotonic() - taken >= 1.5
            assert int(again.index) == index and again.tags["lastCode"] == "timeout"
            assert "w1" in again.tags["lastReason"]
            # late: w2 holds it now, so this deletes nothing (the entry reaches the dead-letter
            # queue below, which a delete would have prevented)
            first.commit(index)
            # w2 hangs too: its lease ends the second delivery, and the entry moves
            assert wait_for(lambda: producer.attributes()["stream.length"] == "0", timeout=20)
        finally:
            other.close()
    finally:
        hung.close()
    dlq = client(policy_server, "hang/dlq")
    [letter] = dlq.get(index=0, length=10, auto_delete=False, timeout="0s")
    assert letter.data == b"poison" and letter.tags["kind"] == "slow"
    assert letter.tags["dlq.index"] == str(index) and letter.tags["dlq.requestId"] == request_id
    assert letter.tags["dlq.deliveries"] == "2" and letter.tags["lastCode"] == "timeout"
