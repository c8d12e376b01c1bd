"""Handlers for the worker tests: `--handler tests.helpers.handlers:dispatch` (they run in the worker
process). `dispatch` picks a behaviour by the entry's `mode` tag; the blocking modes announce on
stderr when they start, so a test can wait on that line instead of polling."""

from __future__ import annotations

import os
import socket
import sys

import trio

from qserve.worker import Retryable


class Unavailable(Exception):
    code = 503


def _announce(tags: dict[str, str]) -> None:
    # one write(2) of a whole line: handler threads print at once, and print() writes the text and
    # the newline separately, so two announcements could share a line
    os.write(sys.stderr.fileno(), f"HANDLER-STARTED {tags['requestId']}\n".encode())


def _wait_for_gate(path: str, limit: float) -> bool:
    """Block this handler thread until the gate at `path` opens (at most `limit` seconds).

    A closed gate is a Unix socket the test listens on; the handler connects and blocks in recv.
    The test opens the gate by closing its listener: every waiting connection is reset at once,
    and a later connect finds nobody listening. No polling, no sleeping."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(limit)
    try:
        sock.connect(path)
    except OSError:
        return True          # nobody listens: the gate is open
    try:
        sock.recv(1)
        return True          # the listener closed (EOF)
    except TimeoutError:
        return False
    except OSError:
        return True          # the listener closed (reset)
    finally:
        sock.close()


def dispatch(data: bytes, tags: dict[str, str]):
    mode = tags.get("mode", "echo")
    if mode == "echo":
        return data.decode().upper()
    if mode == "fail":
        raise ValueError(f"cannot handle {data.decode()}\nsecond line of the message")
    if mode == "coded":
        raise Unavailable("model offline")
    if mode == "huge":               # more than the sink's --max-payload-bytes (default 512 KiB)
        return b"x" * (600 * 1024)
    if mode == "retry":
        if "lastCode" not in tags:
            raise Retryable("warming up", code="Warmup")
        return {"lastCode": tags["lastCode"], "lastReason": tags.get("lastReason"), "data": data.decode()}
    if mode == "gate":               # finishes once the test opens the gate
        _announce(tags)
        return "released" if _wait_for_gate(tags["gate"], 30.0) else "gate never opened"
    if mode == "stuck":              # never finishes on its first delivery
        if tags.get("lastCode") == "Shutdown":
            return "redone after Shutdown"
        _announce(tags)
        _wait_for_gate(tags["gate"] + ".never", 60.0)
        return "stuck handler finished"
    raise KeyError(mode)


async def async_length(data: bytes, tags: dict[str, str]):
    await trio.sleep(0)
    return {"length": len(data), "requestId": tags["requestId"]}
