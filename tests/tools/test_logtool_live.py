"""`qserve log` next to a running server, and on paths that hold no readable queue.

A real `qserve serve` process holds its queues (each queue directory's ``LOCK``): the reading
commands still work and ignore the lock file, repair is refused in one line naming the server's
pid and changes nothing, and after the server stops repair goes ahead. A segment that a running
server compacts away between the listing and the read is simulated exactly (list, then unlink):
it is a note, not damage. Every failure is one line on stderr, no traceback, a non-zero exit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qserve.tools.logtool import cli as logtool
from qserve.tools.logtool.scan import GONE_NOTE, Progress, find_queues, verify_queue

from ..helpers.process import ServerProcess
from ..helpers.sdk import client
from ..helpers.logfiles import build_input, run, segs

COMMANDS = ("dump", "verify", "stats", "repair")


def test_readers_work_while_a_server_runs_and_repair_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    srv = ServerProcess(tmp_path / "data", "--queues", "held").start()
    queue, sink = Path("data/held/input"), Path("data/held/sink")
    try:
        client(srv, "held").put(b"hello", tags={"k": "v"})
        assert (queue / "LOCK").is_file() and (sink / "LOCK").is_file()
        before = {p: p.read_bytes() for p in segs(queue)}

        status, out, err = run(capsys, "dump", "data")
        assert (status, err) == (0, "") and 'data[5]="hello"' in out and "LOCK" not in out
        status, out, err = run(capsys, "verify", "data")
        assert (status, err) == (0, "")
        assert [l.split(":")[0] for l in out.splitlines() if not l.startswith("note ")] == \
            [f"OK {queue}", f"OK {sink}"]
        status, out, err = run(capsys, "stats", "--json", queue)
        assert (status, err) == (0, "") and json.loads(out)["total"]["live"] == 1

        status, out, err = run(capsys, "repair", "data")
        assert (status, out) == (1, "")
        assert err.splitlines() == [
            f"qserve log repair: {q} is in use by process {srv.proc.pid} (a running server?); stop it or "
            "let it fence the queue first" for q in (queue, sink)]
        assert {p: p.read_bytes() for p in segs(queue)} == before        # nothing touched
    finally:
        assert srv.stop() == 0
    status, out, err = run(capsys, "repair", "data")          # the lock died with the server
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == f"OK {queue}: nothing to repair, 1 live entries"
    assert run(capsys, "verify", "data")[0] == 0               # the LOCK files left behind are no segments


def test_segment_compacted_away_while_reading_is_a_note(tmp_path, monkeypatch, capsys):
    """A running server removes a sealed segment after it was listed: verify notes it and exits 0,
    stats leaves it out, dump says so on stderr; none of them fails."""
    monkeypatch.chdir(tmp_path)
    build_input(Path("q"))
    [listed] = find_queues("q")
    victim = listed.segments[1].path
    os.unlink(victim)
    res = verify_queue(listed)
    assert res.problems == []
    assert [(n.file, n.reason) for n in res.notes] == [(victim, GONE_NOTE)]
    [listed] = find_queues("q")          # fresh listing for stats: then remove another one
    gone = listed.segments[0].path
    os.unlink(gone)
    st = logtool.queue_stats(listed, Progress("q", 0, "never"))
    assert [row["segment"] for row in st["segments"]] == [os.path.basename(s.path) for s in listed.segments[1:]]
    assert st["total"]["records"] == sum(row["records"] for row in st["segments"])
    assert f"qserve log: note: {gone} {GONE_NOTE}\n" == capsys.readouterr().err


def _bad_paths(tmp_path: Path) -> dict[str, Path]:
    """Paths each command must refuse in one line."""
    (tmp_path / "a-file").write_text("not a queue")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-queue").mkdir()
    (tmp_path / "not-a-queue" / "notes.txt").write_text("x")
    (tmp_path / "not-a-queue" / "LOCK").write_text("123\n")        # a lock file alone is no queue
    dangling = tmp_path / "dangling"
    build_input(dangling)
    os.symlink("nowhere.seg", dangling / "00000000000000999999.seg")  # listed, cannot be opened
    looping = tmp_path / "looping"
    build_input(looping)
    os.symlink("00000000000000888888.seg", looping / "00000000000000888888.seg")
    paths = {"missing": tmp_path / "missing", "a file": tmp_path / "a-file", "empty": tmp_path / "empty",
             "no queue": tmp_path / "not-a-queue", "dangling": dangling, "looping": looping}
    if os.geteuid() != 0:          # root reads anything: there an unreadable directory cannot be made
        locked = tmp_path / "unreadable"
        build_input(locked / "q")
        os.chmod(locked, 0)
        paths["unreadable"] = locked
    return paths


@pytest.mark.parametrize("command", COMMANDS)
def test_failures_are_one_line(tmp_path, capsys, command):
    paths = _bad_paths(tmp_path)
    try:
        for label, path in paths.items():
            status, out, err = run(capsys, command, path)
            assert status != 0, label
            assert err.count("\n") == 1 and err.startswith("qserve log: "), (label, err)
            assert "Traceback" not in err, (label, err)
            if not (command == "dump" and label in ("dangling", "looping")):   # dump streams what it read
                assert out == "", (label, out)
        status, _, err = run(capsys, command, paths["dangling"])
        if command != "repair":      # repair reports storage's own reason for the queue it could not open
            assert err == (f"qserve log: cannot read {paths['dangling']}/00000000000000999999.seg: "
                           "no such file or directory\n")
    finally:
        if "unreadable" in paths:
            os.chmod(paths["unreadable"], 0o755)


def test_unexpected_error_is_one_line(tmp_path, monkeypatch, capsys):
    """Fault injection: an exception nobody planned for leaves `qserve log` as one line, exit 1."""
    monkeypatch.chdir(tmp_path)
    build_input(Path("q"))

    def broken(queue, progress=None):
        raise RuntimeError("checker bug\nsecond line")

    monkeypatch.setattr(logtool, "verify_queue", broken)
    assert run(capsys, "verify", "q") == (1, "", "qserve log: verify failed: RuntimeError: checker bug\n")
