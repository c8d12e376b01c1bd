"""Queue logs for the `qserve log` tests: `build_input` writes a small log with sealed segments,
deletes, a truncate and a state change at a fixed clock (`NOW`, so output is stable); `run` runs
`qserve log ARGS` in-process and returns its status, stdout and stderr."""

from __future__ import annotations

from pathlib import Path

from qserve.cli import main as cli_main
from qserve.storage import LogConfig, QueueLog

NOW = 1700000000.0


def build_input(path: Path) -> None:
    """Several sealed segments, deletes, a truncate and a state change; no compaction."""
    log = QueueLog.open(path, LogConfig(segment_bytes=400), now=lambda: NOW)
    try:
        for i in range(1, 11):
            log.append(f"payload {i}".encode(), {"requestId": f"req-{i}", "kind": "even" if i % 2 == 0
                                                  else "odd"}, priority=i % 3)
        log.append(b'\x00\xff\n"quoted"\\' + b"x" * 60, {"requestId": "req-bin", "kind": "bin"})
        log.delete([3, 7, 8])
        log.truncate(3)
        log.set_state(state="End")
    finally:
        log.close()


def segs(queue: Path) -> list[Path]:
    return sorted(queue.glob("*.seg"))


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    status = cli_main(["log", *map(str, argv)])
    out, err = capsys.readouterr()
    return status, out, err
