"""The official `eas_prediction.QueueClient` against a `ServerProcess`: a configured client, reading an
SDK watcher's frames in a thread (bounded), and polling a real server for a condition."""

from __future__ import annotations

import threading
import time

from eas_prediction import QueueClient


def client(server, name, token=None, **init):
    c = QueueClient(server.endpoint, name)
    c.set_token(server.token if token is None else token)
    c.init(**init)
    c.set_timeout(10000)  # ms; bounds every request of the tests
    return c


def collect(watcher, n, timeout=30.0, on_frame=None):
    """Read n frames from an SDK watcher in a thread, bounded in time."""
    got, done = [], threading.Event()

    def run():
        try:
            for df in watcher.run():
                got.append(df)
                if on_frame:
                    on_frame(df)
                if len(got) >= n:
                    break
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(timeout), f"only {len(got)} of {n} frames in {timeout}s"
    return got


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        threading.Event().wait(0.02)   # polling a real server process from a thread
    return predicate()
