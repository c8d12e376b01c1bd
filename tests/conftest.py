"""Fixtures more than one layer uses: a real `qserve serve` process on loopback (process/ and tools/),
and service names per test (process/, server/ and tools/)."""

from __future__ import annotations

import itertools
import uuid

import pytest

from .helpers.process import ServerProcess


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One real server for the session; tests use their own service names."""
    srv = ServerProcess(tmp_path_factory.mktemp("qserve-data")).start()
    yield srv
    srv.stop()


@pytest.fixture
def fresh_server(tmp_path):
    """A server of this test's own, for kill/restart scenarios."""
    srv = ServerProcess(tmp_path / "data")
    yield srv
    srv.kill()


_names = itertools.count()


@pytest.fixture
def service() -> str:
    """A service name no other test uses."""
    return f"svc{next(_names)}-{uuid.uuid4().hex[:6]}"
