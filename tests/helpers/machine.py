"""What the tests need of the machine itself (system commands such as `curl`, `bash`, `redis-server`),
and what a test does when one is missing.

On a developer's machine a missing command skips the tests that need it, with the reason (and the
apt-get line that installs it) in pytest's summary. Under CI (the ``CI`` variable is ``true``,
set by .ci/run, which installs these commands first) a missing command is a failure: a skip there
would let a whole suite stop running unnoticed.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["under_ci", "command_missing"]


def under_ci() -> bool:
    """True when the ``CI`` environment variable says so (.ci/run sets ``CI=true``)."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def command_missing(reason: str) -> NoReturn:
    """End the current test (or fixture) for a system command this machine lacks: a skip with
    ``reason`` on a developer's machine, a failure with the same reason under CI."""
    if under_ci():
        pytest.fail(reason)
    pytest.skip(reason)
