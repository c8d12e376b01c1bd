"""`server.idlepoll.IdlePoll` on a real trio loop and in a real server: it finds trio's epoll fd,
a ping-pong whose peer answers within the cap is caught by its polls (the data still reaches the
task, in order), a timer still fires, and `qserve serve` reports its polling in /metrics unless
``--idle-poll-us 0``. The hook's arithmetic on a fake clock: tests/unit/test_idlepoll.py."""

from __future__ import annotations

import http.client
import socket
import threading

import pytest
import trio

from qserve.server.idlepoll import IdlePoll

from ..helpers.process import ServerProcess

LIMIT = 20   # seconds (real time) for any test
ROUNDS = 400


def echo_peer(sock: socket.socket, rounds: int, seen: list[bytes]) -> None:
    """The other side of the ping-pong, in a thread: send a byte, wait for its echo, at once again."""
    for i in range(rounds):
        sock.sendall(bytes([i % 256]))
        seen.append(sock.recv(1))
    sock.close()


async def test_a_peer_that_answers_within_the_cap_is_caught_by_the_poll():
    left, right = socket.socketpair()
    idle = IdlePoll(0.05)   # 50 ms: any turnaround of a thread on this machine is shorter
    seen: list[bytes] = []
    with trio.fail_after(LIMIT):
        assert idle.install()
        try:
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(left))
            peer = threading.Thread(target=echo_peer, args=(right, ROUNDS, seen), daemon=True)
            peer.start()
            got = []
            for _ in range(ROUNDS):
                data = await stream.receive_some(1)
                got.append(data)
                await stream.send_all(data)
            await trio.to_thread.run_sync(peer.join)
        finally:
            idle.uninstall()
        await stream.aclose()
    assert got == seen == [bytes([i % 256]) for i in range(ROUNDS)]
    # the window grew from 0 within a few waits, and from then on the polls saw the bytes come.
    # Counted against the polls, not the rounds: a round whose byte is already there when the loop
    # looks does not wait, and how many do depends on the machine's scheduling (a fresh-clone CI
    # run saw 66 polls in 400 rounds, 60 of them hits)
    assert idle.window > 0 and idle.polls > 0 and idle.hits > idle.polls // 2
    assert idle.seconds > 0


async def test_a_timer_due_inside_the_window_is_not_delayed():
    """The one real wait of these tests: its subject is a real timer. The window (0.5 s) is wider
    than the 50 ms sleep, so the loop must not poll: had it polled to the deadline, trio's
    epoll_wait would then sleep its whole 50 ms timeout once more (>= 100 ms in all). And a wait
    under an autojump clock still lets the clock jump (the test's own limit is virtual there)."""
    idle = IdlePoll(0.5)
    with trio.fail_after(LIMIT):
        assert idle.install()
        try:
            idle.window = 0.5
            start = trio.current_time()
            await trio.sleep(0.05)
            elapsed = trio.current_time() - start
        finally:
            idle.uninstall()
    assert 0.05 <= elapsed < 0.09 and idle.polls == 0


def test_an_autojump_clock_still_jumps_while_the_poll_is_installed():
    """trio jumps an autojump clock after a wait of its threshold that returned no event: the poll
    must leave those waits alone (an earlier design, which woke the loop at a deadline, stopped the
    jumps, and a test under such a clock hung). The limit is real time here, from a watchdog thread:
    under this clock ``fail_after`` would be virtual."""
    clock = trio.testing.MockClock(autojump_threshold=0.01)   # jumps after 10 ms of real idleness
    idle = IdlePoll(0.05)   # a 10 ms wait is within the cap: the window grows and polls as it does

    async def main() -> float:
        assert idle.install()
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            watchdog = threading.Timer(LIMIT, lambda: trio.from_thread.run_sync(scope.cancel, trio_token=token))
            watchdog.start()
            try:
                for _ in range(30):
                    await trio.sleep(1)
            finally:
                watchdog.cancel()
                idle.uninstall()
        assert not scope.cancelled_caught, "the clock stopped jumping"
        return trio.current_time()

    assert trio.run(main, clock=clock) >= 30
    assert idle.polls > 0


async def test_a_second_idle_poll_in_one_run_is_not_installed():
    first, second = IdlePoll(0.001), IdlePoll(0.001)
    with trio.fail_after(LIMIT):
        assert first.install()
        try:
            assert not second.install()   # one poll per loop: two would poll one after the other
            first.uninstall()
            assert second.install()
            second.uninstall()
        finally:
            first.uninstall()


def metrics(srv: ServerProcess) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    conn.request("GET", "/metrics", headers={"Authorization": srv.token})
    body = conn.getresponse().read().decode()
    conn.close()
    return {line.split()[0]: float(line.split()[1]) for line in body.splitlines()
            if line.startswith("qserve_idle_poll")}


@pytest.mark.parametrize("flag", [[], ["--idle-poll-us", "0"]])
def test_a_servers_idle_polls_show_in_its_metrics_unless_turned_off(tmp_path, service, flag):
    srv = ServerProcess(tmp_path / "data", *flag).start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        for i in range(300):   # back to back: each put comes well within the 1 ms cap of the last answer
            conn.request("POST", f"/api/predict/{service}", body=b"x" * 100, headers={"Authorization": srv.token})
            response = conn.getresponse()
            assert (response.status, response.read()) == (200, str(i + 1).encode())
        conn.close()
        seen = metrics(srv)
    finally:
        srv.stop()
    if flag:
        assert seen == {}
    else:
        assert seen["qserve_idle_polls_total"] > 0 and seen["qserve_idle_poll_hits_total"] > 0
        assert seen["qserve_idle_poll_seconds_total"] > 0
