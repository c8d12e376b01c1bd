"""One writer per directory: storage.lock and QueueLog.open's use of it, with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from qserve.storage import DirectoryLocked, DirLock, QueueLog, StorageIOError, lock_holder

HOLDER = """
import sys
from qserve.storage import DirLock
lock = DirLock.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """A child process holding tmp_path's lock until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_second_owner_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(DirectoryLocked) as info:
        DirLock.acquire(tmp_path)
    assert info.value.pid == holder.pid
    assert str(info.value) == f"{tmp_path} is in use by process {holder.pid}"


def test_sigkilled_holder_leaves_no_stale_lock(tmp_path, holder):
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=10)
    assert lock_holder(tmp_path) == holder.pid      # the file still names it: informative only
    with DirLock.acquire(tmp_path) as lock:
        assert lock.held
        assert lock_holder(tmp_path) == os.getpid()
    assert not lock.held


def test_queue_log_holds_its_directory_until_closed(tmp_path):
    log = QueueLog.open(tmp_path)
    log.append(b"x", {})
    with pytest.raises(DirectoryLocked):
        QueueLog.open(tmp_path)          # a second writer, even in the same process
    log.close()
    reopened = QueueLog.open(tmp_path)
    assert [e.data for e in reopened.scan()] == [b"x"]
    reopened.close()


def test_a_refused_open_changes_nothing(tmp_path, holder):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DirectoryLocked):
        QueueLog.open(tmp_path)
    assert sorted(os.listdir(tmp_path)) == before


def test_lock_in_a_directory_that_is_not_one(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(StorageIOError) as info:
        DirLock.acquire(afile)
    assert "Not a directory" in str(info.value)
