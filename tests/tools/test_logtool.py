"""`qserve log dump|verify|stats|repair` against real queue directories built with storage.QueueLog.

Logs are written by ``storage.QueueLog`` with a fixed clock and fixed requestIds, so their bytes (and
every offset the tool prints) are stable; dump and stats output is compared with golden files in
``tests/tools/golden/`` (the etcd-dump-logs ``expectedoutput`` approach). After a deliberate change of
the format or the output, regenerate them with

    QSERVE_UPDATE_GOLDEN=1 /tmp/venv/bin/python -m pytest tests/tools

and review the diff. Damage is injected with small ``corrupt``/``tear`` helpers on the files. The tool
runs in-process (``qserve.cli.main``) with the test's tmp_path as working directory so paths print
relative; one test runs ``python -m qserve log verify`` as a subprocess to prove the CLI wiring.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qserve.cli import main as cli_main
from qserve.storage import LogConfig, QueueLog, iter_records, segment_name
from qserve.storage.record import EntryRecord, encode_entry
from qserve.tools.logtool.scan import Progress

from ..helpers.logfiles import NOW, build_input, run, segs

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[2]


# -- building logs -------------------------------------------------------------------------------
def build_sink(path: Path) -> None:
    """A log where compaction dropped a segment and moved live entries forward (moved=yes)."""
    log = QueueLog.open(path, LogConfig(segment_bytes=300), now=lambda: NOW)
    try:
        for i in range(1, 7):
            log.append(f"result {i}".encode(), {"requestId": f"res-{i}"})
        log.delete([1, 2, 4])
        assert log.maybe_compact() > 0
        log.append(b"after compaction", {"requestId": "res-7"})
    finally:
        log.close()


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """``data/svc/input`` and ``data/svc/sink``; cwd is tmp_path so the tool prints ``data/...``."""
    monkeypatch.chdir(tmp_path)
    build_input(tmp_path / "data" / "svc" / "input")
    build_sink(tmp_path / "data" / "svc" / "sink")
    return Path("data")


def records(path: Path) -> list[tuple[int, object]]:
    return [(off, r) for off, r in iter_records(path) if isinstance(r, EntryRecord)]


def corrupt(path: Path, offset: int) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0xFF
    path.write_bytes(bytes(b))


def tear(path: Path) -> int:
    """Append half of a valid ENTRY frame (an interrupted write); returns where it starts."""
    size = path.stat().st_size
    rec = encode_entry(999, 0, 0, {}, b"never finished")
    with open(path, "ab") as f:
        f.write(rec[: len(rec) // 2])
    return size


# -- running the tool ----------------------------------------------------------------------------
def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("QSERVE_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; run with QSERVE_UPDATE_GOLDEN=1"
    assert text == path.read_text()


# -- golden output -------------------------------------------------------------------------------
def test_dump_text_golden(data, capsys):
    status, out, err = run(capsys, "dump", data)
    assert (status, err) == (0, "")
    golden("dump.txt", out)
    assert "moved=yes" in out and r'data[72]="\x00\xff\n\"quoted\"\\xxx' in out


def test_dump_json_golden(data, capsys):
    status, out, _ = run(capsys, "dump", "--json", data / "svc" / "sink")
    assert status == 0
    golden("dump_sink.jsonl", out)
    objs = [json.loads(line) for line in out.splitlines()]
    entries = {o["index"]: o for o in objs if o["type"] == "entry"}
    assert base64.b64decode(entries[7]["data"]) == b"after compaction"
    assert {o["type"] for o in objs} == {"checkpoint", "entry", "delete"}
    assert all(o["file"].startswith("data/svc/sink/") and o["size"] > 0 for o in objs)


def test_stats_golden(data, capsys):
    status, out, _ = run(capsys, "stats", data)
    assert status == 0
    golden("stats.txt", out)
    status, out, _ = run(capsys, "stats", "--json", data)
    golden("stats.jsonl", out)
    inp, sink = (json.loads(line) for line in out.splitlines())
    assert inp["queue"] == "data/svc/input" and sink["queue"] == "data/svc/sink"
    # input: 11 entries, 3 deleted, 1..2 truncated away; the storage's own count agrees
    assert inp["total"]["entries"] == 11 and inp["total"]["live"] == 6 and inp["total"]["dead"] == 5
    assert inp["state"] == {"state": "End"} and inp["truncate_below"] == 3
    for st in (inp, sink):
        log = QueueLog.open(st["queue"], LogConfig())
        try:
            assert len(log) == st["total"]["live"]
            assert log.statistics()["live_bytes"] == st["total"]["live_bytes"]
        finally:
            log.close()


# -- verify and damage ---------------------------------------------------------------------------
def test_verify_clean(data, capsys):
    status, out, _ = run(capsys, "verify", data)
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("OK data/svc/input: ") and lines[0].endswith(" records")
    assert lines[1].startswith("OK data/svc/sink: ")


def test_flipped_byte(data, capsys):
    queue = data / "svc" / "input"
    seg = segs(queue)[1]                      # a sealed segment
    off, rec = records(seg)[0]              # entry 6, live
    corrupt(seg, off + 30)                    # inside the body: crc mismatch
    status, out, _ = run(capsys, "verify", queue)
    assert status == 1
    assert f"DAMAGE {seg}@{off}: crc mismatch" in out
    assert out.splitlines()[-1].startswith(f"DAMAGED {queue}: 1 problem in ")
    # dump still lists every other record and the damage in its place
    status, out, _ = run(capsys, "dump", queue)
    assert status == 0
    golden("dump_damaged.txt", out)
    assert f"{seg}@{off} DAMAGE corrupt: crc mismatch" in out
    assert f"index={rec.index} " not in out
    assert out.count(" entry ") == 10
    status, out, _ = run(capsys, "dump", "--json", queue)
    dmg = [json.loads(line) for line in out.splitlines() if '"damage"' in line]
    assert dmg == [{"file": str(seg), "offset": off, "size": dmg[0]["size"], "type": "damage",
                    "kind": "corrupt", "reason": "crc mismatch", "resume": off + dmg[0]["size"]}]
    # stats counts the damage and still replays the rest
    status, out, _ = run(capsys, "stats", "--json", queue)
    st = json.loads(out)
    assert st["total"]["damage"] == 1 and st["total"]["entries"] == 10
    # repair drops the record, keeps a .broken copy; then verify is clean
    status, out, _ = run(capsys, "repair", queue)
    assert status == 0
    assert out.startswith(f"REPAIRED {queue}: dropped 1 damaged stretch")
    assert f"dropped {seg}@{off}: crc mismatch" in out
    assert f"kept {seg}.broken" in out and Path(f"{seg}.broken").exists()
    status, out, _ = run(capsys, "verify", queue)
    assert status == 0 and out.startswith(f"OK {queue}: ")
    status, out, _ = run(capsys, "repair", queue)
    assert out == f"OK {queue}: nothing to repair, 6 live entries\n"   # 4-6, 9-11


def test_torn_tail(data, capsys):
    queue = data / "svc" / "sink"
    active = segs(queue)[-1]
    at = tear(active)
    status, out, _ = run(capsys, "verify", data)
    assert status == 1
    assert f"DAMAGE {active}@{at}: torn tail: " in out and "open truncates them" in out
    assert f"OK {data / 'svc' / 'input'}: " in out          # the other queue is reported too
    assert f"DAMAGED {queue}: 1 problem" in out
    status, out, _ = run(capsys, "dump", queue, "--type", "damage")
    assert out.startswith(f"{active}@{at} DAMAGE torn tail: length ") and out.count("\n") == 1
    assert "runs past end of file" in out
    status, out, _ = run(capsys, "repair", "--dry-run", data)      # dry run = verify, nothing changes
    assert status == 1 and not Path(f"{active}.broken").exists()
    status, out, _ = run(capsys, "repair", data)
    assert status == 0
    size = active.stat().st_size
    assert f"REPAIRED {queue}: cut " in out and size == at
    status, out, _ = run(capsys, "verify", data)
    assert status == 0


def test_torn_sealed_segment(data, capsys):
    queue = data / "svc" / "input"
    sealed = segs(queue)[0]
    at = tear(sealed)
    status, out, _ = run(capsys, "verify", queue)
    assert status == 1
    assert f"DAMAGE {sealed}@{at}: torn tail in a sealed segment: " in out


def test_order_header_and_missing_segment(data, capsys):
    queue = data / "svc" / "input"
    files = segs(queue)
    active = files[-1]
    at = active.stat().st_size
    with open(active, "ab") as f:             # an index going backwards (not a moved copy)
        f.write(encode_entry(2, 0, 0, {}, b"late"))
    files[1].unlink()                          # a segment the last checkpoint lists
    stray = queue / segment_name(999)          # a segment without its header
    stray.write_bytes(encode_entry(1000, 0, 0, {}, b"no header"))
    status, out, _ = run(capsys, "verify", queue)
    assert status == 1
    assert f"DAMAGE {active}@{at}: entry index 2 does not follow 6" in out   # 7-11 were in files[1]
    assert f"DAMAGE {stray}@0: segment does not start with its checkpoint (starts with entry)" in out
    assert f"DAMAGE {files[1]}@0: segment missing (listed by the checkpoint at {active}@0)" in out
    assert f"DAMAGED {queue}: 3 problems in " in out


def test_moved_entries_are_exempt_from_order(data, capsys):
    out = run(capsys, "dump", data / "svc" / "sink", "--type", "entry")[1]
    assert "moved=yes" in out
    assert run(capsys, "verify", data / "svc" / "sink")[0] == 0


def test_single_segment_file(data, capsys):
    seg = segs(data / "svc" / "input")[0]
    status, out, _ = run(capsys, "dump", seg)
    assert status == 0 and out.splitlines()[0].startswith(f"{seg}@0 checkpoint base=1 ")
    assert all(line.startswith(f"{seg}@") for line in out.splitlines())
    status, out, _ = run(capsys, "verify", seg)
    assert (status, out) == (0, f"OK {seg}: 1 segment, {len(list(iter_records(seg))) - 1} records\n")


# -- dump filters --------------------------------------------------------------------------------
def _indexes(out: str) -> list[int]:
    return [json.loads(line)["index"] for line in out.splitlines()]


def test_dump_filters(data, capsys):
    q = data / "svc" / "input"
    assert _indexes(run(capsys, "dump", "--json", q, "--from", 4, "--to", 6, "--type", "entry")[1]) == [4, 5, 6]
    out = run(capsys, "dump", q, "--from", 7, "--to", 8)[1]
    assert [line.split()[1] for line in out.splitlines()] == ["entry", "entry", "delete"]
    assert _indexes(run(capsys, "dump", "--json", q, "--tag", "kind=even", "--from", 5)[1]) == [6, 8, 10]
    assert _indexes(run(capsys, "dump", "--json", q, "--tag", "kind=odd", "--tag", "requestId=req-3")[1]) == [3]
    out = run(capsys, "dump", q, "--type", "truncate", "--type", "state")[1]
    assert [line.split()[1:] for line in out.splitlines()] == [["truncate", "below=3"],
                                                                ["state", 'values={"state":"End"}']]
    out = run(capsys, "dump", q, "--from", 1, "--type", "checkpoint", "--type", "entry")[1]
    assert {line.split()[1] for line in out.splitlines()} == {"checkpoint", "entry"}


# -- errors, progress, CLI -----------------------------------------------------------------------
def test_usage_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, out, err = run(capsys, "verify", "nope")
    assert (status, out, err) == (2, "", "qserve log: no such file or directory: nope\n")
    (tmp_path / "empty").mkdir()
    status, _, err = run(capsys, "dump", "empty")
    assert status == 2 and err == "qserve log: no queue directories (holding *.seg files) in empty\n"
    (tmp_path / "notes.txt").write_text("x")
    assert run(capsys, "dump", "notes.txt")[0] == 2
    build_input(tmp_path / "q")
    status, _, err = run(capsys, "stats", segs(Path("q"))[0])
    assert status == 2 and err.startswith("qserve log: needs a queue or data directory")
    assert run(capsys, "dump", "q", "--from", 5, "--to", 2)[0] == 2
    with pytest.raises(SystemExit) as exc:     # argparse's own usage errors exit 2 as well
        cli_main(["log", "dump", "q", "--tag", "novalue"])
    assert exc.value.code == 2


def test_progress_goes_to_stderr(data, capsys):
    q = data / "svc" / "input"
    plain = run(capsys, "dump", q)
    status, out, err = run(capsys, "dump", q, "--progress", "always")
    assert (status, out) == plain[:2]
    assert err.splitlines()[-1].startswith(f"qserve log: {q}: ") and err.endswith("(100%)\n")
    assert run(capsys, "verify", q)[2] == ""             # small queue, auto: nothing


def test_progress_rate_limited():
    t = [0.0]
    stream = io.StringIO()
    p = Progress("q", 200 << 20, stream=stream, clock=lambda: t[0], interval=0.25)
    assert p.active                                      # above the 64 MiB threshold
    for k in range(100):                                 # 100 updates over 1 s: ~4 lines
        t[0] = k / 100
        p.update(k << 20)
    p.finish()
    lines = stream.getvalue().splitlines()
    assert 4 <= len(lines) <= 5 and lines[-1] == "qserve log: q: 200.0 / 200.0 MiB (100%)"
    assert not Progress("q", 10, stream=stream).active
    assert not Progress("q", 200 << 20, "never", stream=stream).active


def test_cli_subprocess(data):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "qserve", "log", "verify", str(data)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("OK data/svc/") == 2
    corrupt(segs(data / "svc" / "input")[0], 100)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 1 and "DAMAGED data/svc/input" in proc.stdout
    proc = subprocess.run(cmd[:-1] + ["missing"], capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 2 and proc.stderr == "qserve log: no such file or directory: missing\n"


def test_leftover_of_compaction(tmp_path, monkeypatch, capsys):
    """A crash after compaction's CHECKPOINT but before the unlink: the old segment is still there,
    unlisted, and its entries are superseded by their moved copies (dead in stats, a note in verify)."""
    monkeypatch.chdir(tmp_path)
    q = Path("q")
    log = QueueLog.open(q, LogConfig(segment_bytes=300), now=lambda: NOW)
    for i in range(1, 7):
        log.append(f"result {i}".encode(), {"requestId": f"res-{i}"})
    log.delete([1, 2, 4])
    first = segs(q)[0]
    saved = first.read_bytes()
    log.maybe_compact()
    log.close()
    first.write_bytes(saved)
    status, out, _ = run(capsys, "verify", q)
    assert status == 0
    assert f"note {first}@0: not listed by the last checkpoint" in out
    st = json.loads(run(capsys, "stats", "--json", q)[1])
    row = st["segments"][0]
    assert (row["segment"], row["entries"], row["live"], row["dead"]) == (first.name, 5, 0, 5)
    log = QueueLog.open(q, LogConfig())        # storage agrees (and removes the leftover)
    try:
        assert len(log) == st["total"]["live"] == 3
    finally:
        log.close()
    assert not first.exists()


def test_preallocated_tail_of_a_running_log(tmp_path, monkeypatch, capsys):
    """A copy of a queue taken while its log is open (what a crash leaves) ends its active segment
    with preallocated zeros: verify notes them and exits 0, dump shows no damage, repair has nothing
    to do."""
    import shutil
    monkeypatch.chdir(tmp_path)
    log = QueueLog.open(tmp_path / "live", LogConfig(preallocate_bytes=4096), now=lambda: NOW)
    for i in range(3):
        log.append(f"p{i}".encode(), {"requestId": f"r{i}"})
    log.sync()
    shutil.copytree(tmp_path / "live", tmp_path / "copy")
    log.close()
    queue = Path("copy")
    (active,) = segs(queue)
    *_, (end, outcome) = iter_records(active)
    assert outcome.kind == "torn" and outcome.zero_filled and active.stat().st_size >= end + 3000
    status, out, _ = run(capsys, "verify", queue)
    assert status == 0 and out.splitlines()[-1].startswith(f"OK {queue}: ")
    assert "bytes of preallocated zeros after the last record" in out
    status, out, _ = run(capsys, "dump", queue)
    assert "DAMAGE" not in out and out.count(" entry ") == 3
    status, out, _ = run(capsys, "repair", queue)
    assert status == 0 and out.startswith(f"OK {queue}: nothing to repair, 3 live entries")
    assert active.stat().st_size == end          # opened and closed cleanly: trimmed
