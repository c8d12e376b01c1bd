"""Fuzzing the running server over HTTP: Hypothesis-generated requests.

What must hold for any input (the issue's list): no 500 (no 5xx at all: no faults are injected
here), no crash, no hang, and the queue state afterwards matches what the valid requests did.

Each example starts an in-process server (memory streams, fsync="never", a data directory of
its own) and sends a sequence of operations, each on its own connection or several pipelined on one,
as raw bytes: valid queue operations decorated with noise (unknown control parameters, unicode and
empty tags, identity/priority/Accept/garbage headers), the same operations with one invalid
parameter, wrong tokens, garbage methods and paths, oversized bodies and headers, and broken framing
(bad chunked encoding, mismatched Content-Length, NUL bytes, bare LF, overlong request lines). Every
answer must parse as well-formed HTTP/1.1 (h11 as the client) with a status below 500 and, for
errors, a one-line reason; broken framing may instead just be closed. A model (`QueueModel`) tracks
what the 200s did (puts, deletes, truncates, commits, auto-deleting gets, end) and predicts every
status, index, get result, count and attribute; the example ends with the full queue content
compared and a health check. WebSocket fuzzing is in test_fuzz_ws.py, memory in test_fuzz_memory.py.

Time: real time (trio.fail_after on every exchange: a hang fails the example). Run the long
variant with `-m slow`.
"""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings

from ..helpers.fuzz_model import Model, check_state, run_ops
from ..helpers.fuzz_ops import FRAMING, op_groups, services
from ..helpers.fuzz_wire import (FUZZ, SETTINGS, check_answer, exchange, fresh_backend, fresh_dir, healthy,
                                 parse_answers)
from ..helpers.inproc import running_server

async def http_example(tmp_path, backend, service, groups) -> None:
    model = Model()
    with trio.fail_after(60):
        async with running_server(fresh_dir(tmp_path), **SETTINGS, **await fresh_backend(backend)) as srv:
            await run_ops(srv, groups, model, service)
            await check_state(srv, model, service)
            await healthy(srv.listener)


@settings(FUZZ, max_examples=60)   # each example a fresh server; test_http_fuzz_long (slow) runs 3000
@given(service=services, groups=op_groups)
async def test_http_fuzz(tmp_path, backend, service, groups):
    await http_example(tmp_path, backend, service, groups)


@pytest.mark.slow
@settings(FUZZ, max_examples=3000)
@given(service=services, groups=op_groups)
async def test_http_fuzz_long(tmp_path, backend, service, groups):
    await http_example(tmp_path, backend, service, groups)


async def test_every_framing_case_once(tmp_path, backend):
    """Each broken-framing case of the list, one by one, then the server still answers."""
    with trio.fail_after(60):
        async with running_server(fresh_dir(tmp_path), **SETTINGS, **await fresh_backend(backend)) as srv:
            for name, data in FRAMING:
                raw = await exchange(srv.listener, data)
                answers = parse_answers(raw, [b"GET"] * 4)
                for a in answers:
                    check_answer(a)
                await healthy(srv.listener)
