"""`qserve.server.phases`: the connection phases' transition table, checked in one place."""

from __future__ import annotations

import pytest

from qserve.server.phases import NEXT, Phase, advance


@pytest.mark.parametrize("current, new", [(c, n) for c in Phase for n in NEXT[c]])
def test_every_transition_of_the_table_is_allowed(current, new):
    assert advance(current, new) is new


@pytest.mark.parametrize("current, new", [(c, n) for c in Phase for n in Phase if n not in NEXT[c]])
def test_every_other_transition_is_refused(current, new):
    with pytest.raises(RuntimeError, match=f"{current.name} -> {new.name}"):
        advance(current, new)


def test_every_phase_is_reachable_from_idle_and_only_the_final_ones_end():
    seen, todo = {Phase.IDLE}, [Phase.IDLE]
    while todo:
        for nxt in NEXT[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    assert seen == set(Phase)
    assert {p for p in Phase if not NEXT[p]} == {Phase.UPGRADED, Phase.DRAINING}
