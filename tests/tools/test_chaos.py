"""`qserve chaos`: the checker on synthetic histories (so it can fail), and short real runs.

The checker tests are synchronous and exact: they build a `History` by hand, including one lost and
one resurrected entry, and an in-flight delivery that must not count as a resurrection; with the
delivery policies (``--policies``), dead letters that cover a put, poison entries committed or left
behind, one requestId at two indexes, damaged dead letters, and commits made late by a lease. The run
tests start the real tool (`python -m qserve chaos`, which starts and SIGKILLs real servers) and read
its JSON summary. On the local backend the short runs are part of the default suite (about 10 s
each, one of them with --policies), the long one is `slow`; on Redis the default suite runs two nodes on the session's redis-server (the
`redis_url` fixture) with three node kills, and the `slow` runs kill nodes and Redis primaries
(chaos's own redis-server, and a primary + replica + Sentinels) at least 50 times each.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from qserve.cli import main as qserve_main
from qserve.tools.chaos.history import History
from qserve.tools.chaos.records import id_of, payload_for
from qserve.tools.chaos.redisd import RedisSetup, RedisStartError

from ..helpers.redis_server import require_redis_server

REPO = Path(__file__).resolve().parents[2]


def _put(h: History, put_id: str, index: int | None, producer: int = 0, tags=None) -> None:
    tags = tags or {"kind": "a"}
    h.put_started(put_id, producer, tags, 0)
    if index is not None:
        h.put_acked(put_id, index)


def _deliver(h: History, index: int, put_id: str, conn_start: int, group: str = "g0", tags=None) -> None:
    h.delivered(index, payload_for(put_id), tags or {"kind": "a", "requestId": "x"}, conn_start=conn_start,
                group=group)


def _commit(h: History, *indexes: int, acked: bool = True) -> int:
    op = h.removal_started("commit", indexes)
    if acked:
        h.removal_acked(op)
    return op.ack or 0


def test_payload_encodes_its_id():
    assert id_of(payload_for("p3-17")) == "p3-17"
    assert payload_for("p3-17") == payload_for("p3-17") != payload_for("p3-18")


def test_clean_history_passes():
    h = History()
    conn = h.tick()
    _put(h, "p0-1", 1)
    _put(h, "p0-2", 2)
    _put(h, "p0-3", None)                 # unknown, never seen: fine
    _deliver(h, 1, "p0-1", conn)
    _deliver(h, 1, "p0-1", conn)          # redelivered (say after a negative)
    _commit(h, 1)
    _deliver(h, 2, "p0-2", conn)
    h.remaining(2, payload_for("p0-2"), {"kind": "a"})
    rep = h.check()
    assert rep.ok, rep.problems
    assert (rep.puts_acked, rep.puts_unknown, rep.deliveries, rep.redeliveries, rep.commits, rep.remaining) == \
        (2, 1, 3, 1, 1, 1)


def test_checker_reports_lost_and_resurrected():
    h = History()
    old_conn = h.tick()
    _put(h, "p0-1", 1)                    # acknowledged, never removed, gone at the end: lost
    _put(h, "p0-2", 2)
    _deliver(h, 2, "p0-2", old_conn)
    committed = _commit(h, 2)
    _deliver(h, 2, "p0-2", old_conn, group="g1")     # in flight when the commit was applied: not counted
    assert h.check().resurrected == 0
    new_conn = h.tick()
    assert new_conn > committed
    _deliver(h, 2, "p0-2", new_conn)      # on a connection opened after the acknowledged commit
    rep = h.check()
    assert (rep.lost, rep.resurrected) == (1, 1)
    assert not rep.ok
    assert any(p.startswith("lost: p0-1") for p in rep.problems)
    assert any(p.startswith("resurrected: index 2") for p in rep.problems)


def test_entry_left_after_acknowledged_delete_or_truncate_is_resurrected():
    h = History()
    for i in range(1, 5):
        _put(h, f"p0-{i}", i)
    h.removal_acked(h.removal_started("delete", (4,)))
    h.removal_acked(h.removal_started("truncate", below=3))
    for i in (2, 3, 4):                   # 2 is below the truncate, 4 was deleted; 1 is simply gone
        h.remaining(i, payload_for(f"p0-{i}"), {"kind": "a"})
    rep = h.check()
    assert (rep.lost, rep.resurrected, rep.deletes, rep.truncates) == (0, 2, 1, 1)


def test_unacknowledged_removals_excuse_a_missing_entry_but_do_not_resurrect():
    h = History()
    _put(h, "p0-1", 1)
    _put(h, "p0-2", 2)
    _commit(h, 1, acked=False)            # the answer never came: it may have happened
    h.remaining(2, payload_for("p0-2"), {"kind": "a"})
    conn = h.tick()
    _commit(h, 2, acked=False)
    _deliver(h, 2, "p0-2", conn + 1)
    rep = h.check()
    assert rep.ok and rep.lost == 0 and rep.resurrected == 0, rep.problems


def test_duplicate_indexes_order_and_corruption_are_reported():
    h = History()
    _put(h, "p0-1", 5)
    _put(h, "p0-2", 4)                    # the same producer got a lower index later
    _put(h, "p1-1", 5, producer=1)        # a second acknowledged id at index 5
    h.remaining(5, payload_for("p0-1"), {"kind": "a"})
    h.remaining(4, payload_for("p0-2")[:-1] + b"?", {"kind": "a"})   # payload damaged
    h.remaining(7, payload_for("p1-1"), {"kind": "b"})               # at a second index, tag changed
    rep = h.check()
    assert rep.out_of_order == 1
    assert rep.corrupted == 2
    assert rep.duplicates_index == 2      # p1-1 at 5 and 7; index 5 acknowledged twice
    assert not rep.ok


def test_unknown_put_seen_before_its_index_was_reused_is_tolerated():
    h = History()
    conn = h.tick()
    _put(h, "p0-1", None)
    _deliver(h, 3, "p0-1", conn)          # stored, not fsynced, cut as a torn tail by the restart...
    _put(h, "p0-2", 3)                    # ...so index 3 was handed out again
    h.remaining(3, payload_for("p0-2"), {"kind": "a"})
    rep = h.check()
    assert rep.ok and rep.reused == 1, rep.problems


# -- the checker with delivery policies (--policies) --------------------------------------------

def _dead(h: History, dlq_index: int, put_id: str, origin: int, *, group: str = "g0", code: str = "500",
          deliveries: str = "3", request_id: str = "", tags=None) -> None:
    h.dead_letter(dlq_index, payload_for(put_id), {**(tags or {"kind": "a"}), "dlq.queue": "chaos",
                                                    "dlq.index": str(origin), "dlq.requestId": request_id,
                                                    "dlq.group": group, "dlq.deliveries": deliveries,
                                                    "lastCode": code, "lastReason": "chaos"})


def _policies() -> History:
    return History(queue="chaos", max_deliveries=3, delivery_timeout=2.0)


POISON_TAGS = {"kind": "a", "poison": "1"}


def test_dead_lettered_put_is_not_lost_and_poison_there_passes():
    h = _policies()
    conn = h.tick()
    _put(h, "p0-1", 1, tags=POISON_TAGS)
    _put(h, "p0-2", 2)
    for _ in range(3):                    # refused three times, then moved
        _deliver(h, 1, "p0-1", conn, tags=POISON_TAGS)
        h.negative_acked(delayed=True)
    _deliver(h, 2, "p0-2", conn)
    _dead(h, 1, "p0-1", 1, tags=POISON_TAGS)
    _dead(h, 2, "p0-2", 2)                # an ordinary entry may end there too
    rep = h.check()
    assert rep.ok, rep.problems
    assert (rep.lost, rep.dead_lettered, rep.poison_puts, rep.poison, rep.delayed_negatives) == (0, 2, 1, 0, 3)


def test_acknowledged_put_neither_in_the_queue_nor_the_dead_letter_queue_is_lost():
    h = _policies()
    _put(h, "p0-1", 1)
    _put(h, "p0-2", 2)
    _dead(h, 1, "p0-2", 2)                # another put's dead letter does not cover p0-1
    rep = h.check()
    assert (rep.lost, rep.dead_lettered) == (1, 1)
    assert any(p.startswith("lost: p0-1") for p in rep.problems)


def test_a_committed_or_stranded_poison_entry_fails():
    h = _policies()
    conn = h.tick()
    for i in (1, 2, 3, 4):
        _put(h, f"p0-{i}", i, tags=POISON_TAGS)
    _deliver(h, 1, "p0-1", conn, tags=POISON_TAGS)
    _commit(h, 1)                         # a poison entry committed: never allowed
    h.remaining(2, payload_for("p0-2"), POISON_TAGS)     # never dead-lettered
    h.removal_started("delete", (3,))     # an unknown delete covers it: excused
    _dead(h, 1, "p0-4", 4, tags=POISON_TAGS)             # p0-4 is where it belongs
    rep = h.check()
    assert rep.poison == 2 and not rep.ok
    assert any(p.startswith("poison: p0-1") and "was committed" in p for p in rep.problems)
    assert any(p.startswith("poison: p0-2") and "still in the queue" in p for p in rep.problems)
    assert rep.lost == 0


def test_a_retried_put_is_one_entry():
    h = _policies()
    _put(h, "p0-1", 5, tags={"kind": "a", "requestId": "p0-1"})
    h.put_retried("p0-1")
    h.put_acked("p0-1", 5, duplicate=True)                # the duplicate answer: the original index
    h.put_started("p0-2", 0, {"kind": "a", "requestId": "p0-2"}, 0)     # its answer was lost...
    h.put_retried("p0-2")
    h.put_acked("p0-2", 6, duplicate=True)                # ...the retry finds it stored
    h.remaining(5, payload_for("p0-1"), {"kind": "a", "requestId": "p0-1"})
    h.remaining(6, payload_for("p0-2"), {"kind": "a", "requestId": "p0-2"})
    rep = h.check()
    assert rep.ok, rep.problems
    assert (rep.puts_acked, rep.duplicate_answers, rep.duplicates_index) == (2, 2, 0)


def test_two_indexes_for_one_deduplicated_request_id_fail():
    h = _policies()
    _put(h, "p0-1", 5, tags={"kind": "a", "requestId": "p0-1"})
    h.put_retried("p0-1")
    h.put_acked("p0-1", 9)                # stored again
    for i in (5, 9):
        h.remaining(i, payload_for("p0-1"), {"kind": "a", "requestId": "p0-1"})
    rep = h.check()
    assert rep.duplicates_index == 2 and not rep.ok       # two indexes; a retry answered as new
    assert any("id p0-1 seen at indexes [5, 9]" in p for p in rep.problems)
    assert any("answered as a new entry at index 9" in p for p in rep.problems)
    h = _policies()                       # dead-lettered and also left in the queue: two entries
    _put(h, "p0-1", 5)
    h.remaining(5, payload_for("p0-1"), {"kind": "a"})
    _dead(h, 1, "p0-1", 5)
    assert h.check().duplicates_index == 1


def test_a_retry_after_a_torn_tail_may_get_a_new_index():
    tags = {"kind": "a", "requestId": "p0-1"}
    h = _policies()
    conn = h.tick()
    h.put_started("p0-1", 0, tags, 0)
    _deliver(h, 3, "p0-1", conn, tags=tags)          # stored, not yet durable, delivered...
    h.killed()                            # ...and cut as a torn tail
    h.put_retried("p0-1")
    h.put_acked("p0-1", 3)                # the retry is stored anew (here at the same index)
    h.put_retried("p0-1")
    h.put_acked("p0-1", 3, duplicate=True)
    h.remaining(3, payload_for("p0-1"), tags)
    assert h.check().ok
    h = _policies()
    conn = h.tick()
    h.put_started("p0-1", 0, tags, 0)
    _deliver(h, 3, "p0-1", conn, tags=tags)
    h.killed()
    h.put_retried("p0-1")
    h.put_acked("p0-1", 4)                # at another index: the first copy was cut
    h.remaining(4, payload_for("p0-1"), tags)
    rep = h.check()
    assert rep.ok and rep.reused == 1, rep.problems
    h.remaining(3, payload_for("p0-1"), tags)    # ...unless it is still there
    assert h.check().duplicates_index == 1


def test_dead_letter_must_be_the_entry_it_was():
    h = _policies()
    _put(h, "p0-1", 1, tags={"kind": "a", "requestId": "p0-1"})
    _put(h, "p0-2", 2)
    _put(h, "p0-3", 3)
    _dead(h, 1, "p0-1", 7, request_id="p0-1")             # dlq.index is not the index it had
    _dead(h, 2, "p0-2", 2, deliveries="2")                # moved before max_deliveries
    h.dead_letter(3, payload_for("p0-3")[:-1] + b"?", {"kind": "a", "dlq.queue": "chaos", "dlq.index": "3",
                                                       "dlq.deliveries": "3"})   # payload damaged
    h.dead_letter(4, payload_for("x9-9"), {"dlq.queue": "chaos", "dlq.index": "9", "dlq.deliveries": "3"})
    rep = h.check()
    assert rep.corrupted == 4 and not rep.ok, rep.problems
    assert any("dlq.index 7 (acknowledged at 1)" in p for p in rep.problems)
    assert any("dlq.deliveries '2'" in p for p in rep.problems)


def _lease_history(*, lease_evidence: bool) -> History:
    """c1 commits index 1 long after its delivery; another member got it on after its lease."""
    h = _policies()
    _put(h, "p0-1", 1)
    conn = h.tick()
    _deliver(h, 1, "p0-1", conn, tags={"kind": "a"})
    h.delivered(1, payload_for("p0-1"), {"kind": "a"}, conn_start=conn, group="g0", consumer="c1")
    op = h.removal_started("commit", (1,), by="c1", group="g0", conn_start=conn)
    h.removal_acked(op, held=0.01)
    later = h.tick()
    code = "timeout" if lease_evidence else "500"
    h.delivered(1, payload_for("p0-1"), {"kind": "a", "lastCode": code}, conn_start=later, group="g0",
                consumer="c2")
    return h


def test_a_commit_after_the_lease_ran_out_may_have_deleted_nothing():
    h = _lease_history(lease_evidence=True)
    h.remaining(1, payload_for("p0-1"), {"kind": "a"})
    rep = h.check()
    assert rep.ok and rep.late_commits == 1 and rep.lease_timeouts == 1, rep.problems
    rep = _lease_history(lease_evidence=False).check()      # nothing says the lease ran out
    assert rep.resurrected == 1 and rep.late_commits == 0


def test_the_history_counts_deliveries_after_a_lease_ran_out_as_they_come():
    """What the workload's quiet phase waits for (`Workload._a_lease_ran_out`)."""
    assert _lease_history(lease_evidence=True).timed_out == 1
    assert _lease_history(lease_evidence=False).timed_out == 0


def test_late_commits_by_kill_connection_or_clock():
    for late in ("kill", "connection", "clock"):
        h = _policies()
        _put(h, "p0-1", 1)
        conn = h.tick()
        h.delivered(1, payload_for("p0-1"), {"kind": "a"}, conn_start=conn, group="g0", consumer="c1")
        if late == "kill":
            h.killed()
        op = h.removal_started("commit", (1,), by="c1", group="g0",
                               conn_start=h.tick() if late == "connection" else conn)
        h.removal_acked(op, held=1.5 if late == "clock" else 0.01)
        h.remaining(1, payload_for("p0-1"), {"kind": "a"})
        rep = h.check()
        assert rep.ok and rep.late_commits == 1, (late, rep.problems)
    h = History()                          # without a lease every acknowledged commit deletes
    _put(h, "p0-1", 1)
    conn = h.tick()
    h.delivered(1, payload_for("p0-1"), {"kind": "a"}, conn_start=conn, group="g0", consumer="c1")
    h.killed()
    op = h.removal_started("commit", (1,), by="c1", group="g0", conn_start=conn)
    h.removal_acked(op, held=5.0)
    h.remaining(1, payload_for("p0-1"), {"kind": "a"})
    assert h.check().resurrected == 1


def test_a_commit_after_another_groups_negative_commit_is_late():
    """A negative commit releases the entry in every group that holds it: c3 of g1 got it on after
    c2 of g0 refused it, while c1's older frame of it waited, so c1's commit deleted nothing."""
    h = _policies()
    _put(h, "p0-1", 1)
    conn = h.tick()
    h.delivered(1, payload_for("p0-1"), {"kind": "a"}, conn_start=conn, group="g0", consumer="c2")
    h.negative_started(1, by="c2")
    h.negative_acked()
    h.delivered(1, payload_for("p0-1"), {"kind": "a", "lastCode": "500"}, conn_start=conn, group="g1",
                consumer="c3")
    h.delivered(1, payload_for("p0-1"), {"kind": "a"}, conn_start=conn, group="g1", consumer="c1")
    op = h.removal_started("commit", (1,), by="c1", group="g1", conn_start=conn)
    h.removal_acked(op, held=0.01)
    h.delivered(1, payload_for("p0-1"), {"kind": "a", "lastCode": "500"}, conn_start=h.tick(), group="g0",
                consumer="c0")
    rep = h.check()
    assert rep.ok and rep.late_commits == 1, rep.problems


def run_chaos(*args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([sys.executable, "-m", "qserve", "chaos", "--json", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.stdout.strip(), f"no summary (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc, json.loads(proc.stdout)


def _assert_clean(proc: subprocess.CompletedProcess, summary: dict, rounds: int, verify: str = "clean") -> None:
    detail = json.dumps({k: summary[k] for k in ("problems", "verify_problems", "seed")}, indent=1)
    assert proc.returncode == 0, f"exit {proc.returncode}: {detail}\n{proc.stderr[-2000:]}"
    assert summary["lost"] == 0 and summary["resurrected"] == 0, detail
    assert summary["duplicates_index"] == 0 and summary["corrupted"] == 0, detail
    assert summary["out_of_order"] == 0 and summary["ok"], detail
    assert summary["verify"] == verify, detail
    assert summary["kills"] == rounds and summary["restarts"] == rounds, proc.stderr[-2000:]
    assert summary["puts_acknowledged"] > 0 and summary["deliveries"] > 0 and summary["commits"] > 0


def test_short_chaos_run(tmp_path):
    data = tmp_path / "data"
    proc, summary = run_chaos("--rounds", "3", "--seconds", "1.5", "--seed", "7", "--producers", "2",
                              "--consumers", "3", "--data-dir", str(data), timeout=90)
    _assert_clean(proc, summary, 3)
    assert "seed 7" in proc.stderr and proc.stderr.count("round ") >= 3
    assert data.is_dir()                  # a directory the user named is never removed


def test_short_chaos_run_with_policies(tmp_path):
    """--policies: the servers dead-letter, deduplicate, delay and hand on after a lease, and the
    checker passes the run (poison entries in the dead-letter queue, retried puts one entry)."""
    proc, summary = run_chaos("--policies", "--rounds", "3", "--seconds", "1.5", "--seed", "3", "--producers", "2",
                              "--consumers", "3", "--data-dir", str(tmp_path / "data"), timeout=120)
    _assert_clean(proc, summary, 3)
    assert summary["policies"] and summary["poison"] == 0
    for happened in ("dead_lettered", "duplicate_answers", "delayed_negatives", "lease_timeouts", "poison_puts"):
        assert summary[happened] > 0, (happened, summary)


def test_chaos_refuses_a_used_data_dir(tmp_path):
    (tmp_path / "junk").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "qserve", "chaos", "--data-dir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "not a fresh" in proc.stderr


@pytest.mark.slow
def test_long_chaos_run():
    proc, summary = run_chaos("--rounds", "15", "--seconds", "3", timeout=600)
    _assert_clean(proc, summary, 15)


def _chaos(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qserve", "chaos", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


def test_chaos_start_up_failures_are_one_line(tmp_path):
    (tmp_path / "junk").write_text("x")
    proc = _chaos("--data-dir", str(tmp_path))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"qserve chaos: --data-dir {tmp_path} is not a fresh (empty) directory\n"
    proc = _chaos("--data-dir", str(tmp_path / "junk" / "data"))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"qserve chaos: cannot create the data directory {tmp_path / 'junk' / 'data'}: not a directory\n"
    proc = _chaos("--port", "70000")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1


def test_chaos_on_a_busy_port_is_one_line(tmp_path):
    """Another process listens on the port: the server cannot start, chaos says why in one line."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _chaos("--port", str(port), "--data-dir", str(tmp_path / "data"), "--rounds", "1")
    assert (proc.returncode, proc.stdout) == (1, "")
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"qserve chaos: failed: the server on port {port} exited with status 1: ")
    assert "address already in use" in line.lower() and line.endswith(f"; data kept in {tmp_path / 'data'}")


# -- on Redis ------------------------------------------------------------------------------------

def test_short_multi_node_chaos_on_redis(redis_server, redis_url):
    """Two nodes on the session's Redis, three node kills (seed 2: node 1, node 2, node 1), a lease
    of 1 s: clean. The database held a key, so --flush was needed, and it emptied it first."""
    redis_server.call("SET", "left-over", "x")
    proc, summary = run_chaos("--backend", redis_url, "--flush", "--rounds", "3", "--seconds", "1.5", "--seed", "2",
                              "--producers", "2", "--consumers", "4", "--node-lease", "1", timeout=90)
    _assert_clean(proc, summary, 3, verify="n/a")
    assert (summary["nodes"], summary["backend"], summary["kill_kinds"]) == (2, redis_url, {"node": 3})
    assert f"flushed 1 key from {redis_url.removeprefix('redis://')}" in proc.stderr
    assert "killed node 1" in proc.stderr and "killed node 2" in proc.stderr
    assert proc.stderr.count("round ") >= 3 and summary["redeliveries"] > 0
    assert redis_server.call("EXISTS", "left-over") == 0


@pytest.mark.slow
def test_chaos_with_policies_on_redis(redis_server, redis_url):
    """--policies on two nodes on the session's Redis, three node kills: the policies happen across
    the nodes and the run is clean."""
    proc, summary = run_chaos("--policies", "--backend", redis_url, "--flush", "--rounds", "3", "--seconds", "1.5",
                              "--seed", "2", "--producers", "2", "--consumers", "4", "--node-lease", "1", timeout=300)
    _assert_clean(proc, summary, 3, verify="n/a")
    assert summary["poison"] == 0
    for happened in ("dead_lettered", "duplicate_answers", "delayed_negatives", "lease_timeouts", "poison_puts"):
        assert summary[happened] > 0, (happened, summary)


def test_chaos_leaves_a_redis_with_keys_alone(redis_server, redis_url):
    redis_server.call("SET", "precious", "x")
    proc = _chaos("--backend", redis_url)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"qserve chaos: redis at {redis_url.removeprefix('redis://')} holds 1 key; chaos needs "
                           f"an empty database (--flush empties it first)\n")
    assert redis_server.call("GET", "precious") == b"x"


def test_chaos_on_redis_usage_errors_are_one_line(tmp_path, capsys):
    """Through `qserve.cli.main` in this process (each is refused before anything starts); the
    refused Redis above and the unreachable one below go through the real command."""
    for args, text in [
        (("--nodes", "3"), "--nodes needs --backend or --kill-redis"),
        (("--replica",), "--replica needs --kill-redis"),
        (("--backend", "redis://127.0.0.1:1", "--kill-redis"), "give --backend or --kill-redis, not both"),
        (("--flush",), "--flush empties the --backend database; it needs --backend"),
        (("--backend", "http://u:pw@x"), "--backend: expected redis://"),
        (("--backend", "redis://127.0.0.1:1", "--data-dir", str(tmp_path)), "--backend needs none"),
        (("--kill-redis", "--nodes", "0"), "--nodes 0 is not between 1 and 64"),
        (("--kill-redis", "--node-lease", "0"), "--node-lease must be at least 0.1 seconds"),
        (("--kill-redis", "--port", "65535"), "2 nodes need ports 65535-65536"),
        (("--policies", "--consumers", "0"), "--policies needs --consumers >= 1"),
    ]:
        assert qserve_main(["chaos", *args]) == 2, args
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("qserve chaos: ") and err.count("\n") == 1, err
        assert text in err and "pw" not in err, (args, err)
    assert not any(tmp_path.iterdir())


async def test_a_redis_that_exited_on_its_own_is_reported_not_counted_as_a_kill(tmp_path):
    """chaos's own Redis (one primary): when the server it is about to kill has already exited
    (here: killed behind its back), the round fails with one line saying so, and no kill is
    counted (a run once reported 49 kills for 50 rounds)."""
    require_redis_server()
    setup = RedisSetup(tmp_path / "redis", replica=False)
    with trio.fail_after(60):
        await setup.start()
        try:
            victim = setup.servers[0]
            os.kill(victim.proc.pid, signal.SIGKILL)
            victim.proc.wait(10)
            with pytest.raises(RedisStartError) as caught:
                await setup.kill_primary(0.1)
            assert setup.kills == 0
            line = str(caught.value)
            assert "\n" not in line and line.startswith(f"redis-server a on port {victim.port} had exited on its own")
            assert f"(status {-signal.SIGKILL})" in line
        finally:
            await setup.stop()


def test_chaos_on_an_unreachable_redis_is_one_line():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]          # bound, not listening: connections are refused
        proc = _chaos("--backend", f"redis://user:secret@127.0.0.1:{port}/0")
    assert (proc.returncode, proc.stdout) == (1, "")
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"qserve chaos: failed: cannot use redis at 127.0.0.1:{port}/0: ")
    assert "secret" not in line and "data kept" not in line


@pytest.mark.slow
@pytest.mark.parametrize("setup", [(), ("--replica",)], ids=["primary", "sentinel"])
def test_long_chaos_run_on_redis(setup):
    """At least 50 kills of nodes and Redis primaries (chaos's own redis-server; with --replica the
    Sentinels fail over to the replica and the nodes write with --redis-wait 1)."""
    require_redis_server()
    proc, summary = run_chaos("--kill-redis", *setup, "--rounds", "50", "--seconds", "2", timeout=1500)
    _assert_clean(proc, summary, 50, verify="n/a")
    assert summary["kill_kinds"]["node"] > 0 and summary["kill_kinds"]["redis"] > 0
