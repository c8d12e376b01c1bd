"""`app.RequestIds`: the requestIds the server gives puts that bring none keep the UUID4 form
clients see (docs/protocol.md 5.1) and never repeat, within an instance or across instances."""

from __future__ import annotations

import uuid

from qserve.server.app import RequestIds


def test_ids_are_uuid4_strings() -> None:
    ids = RequestIds()
    for _ in range(100):
        rid = ids()
        parsed = uuid.UUID(rid)
        assert (str(parsed), parsed.version, parsed.variant) == (rid, 4, uuid.RFC_4122)


def test_ids_never_repeat_within_and_across_instances() -> None:
    a, b = RequestIds(), RequestIds()
    seen = {a() for _ in range(20_000)} | {b() for _ in range(20_000)}
    assert len(seen) == 40_000


def test_a_spent_counter_draws_a_fresh_prefix() -> None:
    ids = RequestIds()
    ids._next = RequestIds._LIMIT - 1
    last = ids()
    assert last.endswith("-ffffffffffff")
    after = ids()
    assert after[:24] != last[:24] and uuid.UUID(after).version == 4
