"""Crash test: a child appends and reports durable indexes; the parent SIGKILLs it and checks."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from qserve.storage import LogConfig, QueueLog

from ..helpers.crash_child import payload

ROOT = Path(__file__).resolve().parents[2]


def run_child(path, seg_bytes, lines, rng):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "tests.helpers.crash_child", str(path), str(seg_bytes)],
                         stdout=subprocess.PIPE, cwd=ROOT, env=env)
    durable = []
    try:
        first = p.stdout.readline().split()
        assert first[0] == b"open"
        for _ in range(lines):
            line = p.stdout.readline()
            if not line:
                break
            durable.extend(int(x) for x in line.split())
        # let it run on a little past the last line we read, then kill it mid-flight
        for _ in range(rng.randrange(0, 3000)):
            pass
        p.send_signal(signal.SIGKILL)
    finally:
        p.wait(timeout=30)
        p.stdout.close()
    assert p.returncode == -signal.SIGKILL
    return int(first[1]), durable


def test_sigkill_rounds(tmp_path):
    rng = random.Random(1234)
    seen_max = 0
    for round_ in range(4):
        start, durable = run_child(tmp_path, 4096, rng.randrange(5, 60), rng)
        assert start > seen_max or seen_max == 0
        assert durable, "child reported nothing durable"
        log = QueueLog.open(tmp_path, LogConfig(segment_bytes=4096))
        for i in durable:
            e = log.read(i)
            assert e is not None, f"durable index {i} lost (round {round_})"
            assert e.data == payload(i) and e.tags == {"requestId": f"r{i}"}
        assert log.find_request_id(f"r{durable[-1]}").index == durable[-1]
        seen_max = max(seen_max, durable[-1], log.last_index)
        e = log.append(b"parent", {})
        assert e.index > seen_max
        seen_max = e.index
        log.close()
