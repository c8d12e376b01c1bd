"""Running a `qserve` subcommand as a child process (`python -m qserve ...`), bounded in time and
without the caller's QSERVE_* settings, and checking a refusal: one line on stderr, no traceback,
a given exit status."""

from __future__ import annotations

import os
import subprocess
import sys

TIMEOUT = 120   # seconds one command may take (a migration of a few thousand entries takes ~1)


def run_qserve(*args: str, env: dict[str, str] | None = None, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``python -m qserve ARGS``'s exit status and output; ``env`` adds variables (QSERVE_BACKEND)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QSERVE_")}
    return subprocess.run([sys.executable, "-m", "qserve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**clean, **(env or {})})


def assert_one_line(proc: subprocess.CompletedProcess, command: str, *needles: str, status: int = 1) -> str:
    """The command exited with ``status``, printed nothing on stdout and one line on stderr,
    ``qserve COMMAND: ...``, naming every needle. Returns that line."""
    assert proc.returncode == status, (proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"qserve {command}: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert proc.stdout == ""
    return lines[0]
