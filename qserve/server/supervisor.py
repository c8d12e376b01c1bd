"""`qserve serve --processes N`: N server processes sharing one port, and the supervisor that keeps them.

Strategy: the supervisor is the process the user started; it serves nothing itself. It binds the
address once with SO_REUSEPORT but does not listen on it: that keeps the port (with ``--port 0``
it is the port the kernel picked, then given to every process) and takes no connection. Each
process is ``qserve serve`` run again with the user's own arguments (so the same flags, TOML file
and environment decide its settings) plus ``--port PORT --processes 1``; it binds its own socket
with SO_REUSEPORT on that address and the kernel spreads new connections over the sockets that
listen. A marker in its environment (`SUPERVISOR_ENV`: the supervisor's pid and the write end of a
pipe) makes it such a process: it writes one line into the pipe once it listens, and asks the
kernel for a SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``), so that a supervisor killed
with SIGKILL leaves no server behind.

The supervisor starts process 1 alone first: if it cannot start (Redis unreachable, a queue that
cannot open) the user sees its one line and the same exit status as without ``--processes``. Then
the others; once all listen it logs one "qserve listening on ..." line. A process that dies is
started again (one line each time): at once if it had served for `STABLE` seconds, else after a
delay that doubles from `FIRST_DELAY` to `MAX_DELAY`; after `GIVE_UP_AFTER` deaths in a row before
listening the supervisor gives up (one line), stops the others and exits 1.

The processes run in process groups of their own, so a Ctrl-C in a terminal reaches only the
supervisor (which would otherwise be each process's second signal: stop at once). The first
SIGINT/SIGTERM is passed on to every process as SIGTERM (each drains, as a single server does); what
is still running ``--shutdown-timeout`` + `MARGIN` seconds later is killed. A second signal passes
SIGTERM on again (each process's second signal: stop at once). A process still starting when the
stop comes (no "listening" line yet) may die of that SIGTERM before it has a handler for it: that is
a clean stop too, it has answered nothing. Exit status: 0 when every process stopped cleanly, 128 +
the signal's number after a second signal, 1 otherwise.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass

import trio

from qserve.config import Config
from qserve.server.startup import StartupError, bind_sockets
from qserve.signals import numbered

__all__ = ["SUPERVISOR_ENV", "Supervised", "supervised_process", "supervise", "Supervisor"]

log = logging.getLogger("qserve.supervisor")

SUPERVISOR_ENV = "QSERVE_SUPERVISOR"   # "PID FD" in a process the supervisor started
STABLE = 30.0         # seconds a process must have served for its death to be restarted at once
FIRST_DELAY = 0.25    # seconds before restarting a process that died sooner (doubles each time)
MAX_DELAY = 8.0
GIVE_UP_AFTER = 5     # deaths in a row before listening
MARGIN = 5.0          # seconds past --shutdown-timeout a process gets before SIGKILL
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


# -- the supervised process's side ------------------------------------------------------------------


@dataclass(frozen=True)
class Supervised:
    """A server process started by the supervisor: ``fd`` is its pipe to the supervisor."""

    fd: int

    def listening(self) -> None:
        """Tell the supervisor this process listens (once). A supervisor already gone is no
        error: the kernel sends this process SIGTERM for it."""
        try:
            os.write(self.fd, b"listening\n")
        except OSError:
            pass
        finally:
            os.close(self.fd)


def supervised_process(environ: MutableMapping[str, str]) -> Supervised | None:
    """In a process the supervisor started (`SUPERVISOR_ENV` in ``environ``): remove the marker
    (nothing this process starts inherits it), have the kernel send this process SIGTERM when the
    supervisor dies, and return how to tell it this process listens. None in any other process.

    Raises:
        StartupError: the marker is malformed, or the supervisor is already gone.
    """
    value = environ.pop(SUPERVISOR_ENV, None)
    if value is None:
        return None
    try:
        pid, fd = (int(part) for part in value.split())
    except ValueError:
        raise StartupError(f"{SUPERVISOR_ENV} is set by `qserve serve --processes` for its own processes; "
                           f"got {value!r}") from None
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        raise StartupError(f"cannot ask to be stopped with the supervisor: {os.strerror(ctypes.get_errno())}")
    if os.getppid() != pid:   # it died before the request above took effect
        raise StartupError(f"the supervisor (pid {pid}) that started this process is gone")
    return Supervised(fd)


# -- the supervisor -----------------------------------------------------------------------------------


def supervise(config: Config, argv: list[str]) -> int:
    """Run ``config.processes`` server processes on one port until a stop signal; ``argv`` is the
    command line after ``qserve`` (what each process runs again). Returns the exit status."""
    try:
        kept = bind_sockets(config.host, config.port, reuse_port=True, listen=False)
    except StartupError as exc:
        print(f"qserve: {exc}", file=sys.stderr)
        return 1
    try:
        port = kept[0].getsockname()[1]
        command = [sys.executable, "-m", "qserve", *argv, "--port", str(port), "--processes", "1"]
        return trio.run(Supervisor(config, command, port).run)
    finally:
        for sock in kept:
            sock.close()


@dataclass
class _Child:
    """One running server process: its `Popen`, a pidfd (readable once it exited) and the read end
    of its pipe."""

    number: int
    popen: subprocess.Popen
    pidfd: int
    pipe: trio.lowlevel.FdStream
    started: float
    killed: bool = False   # by the supervisor, after the grace period

    def close(self) -> None:
        os.close(self.pidfd)


class Supervisor:
    """Keeps ``config.processes`` processes running ``command`` (see the module docstring). Its
    `run` is the whole life of `qserve serve --processes N` inside `trio.run`."""

    def __init__(self, config: Config, command: list[str], port: int) -> None:
        self._config = config
        self._command = command
        self._port = port
        self._running: dict[int, _Child] = {}   # process number -> its live process
        self._stopping = trio.Event()
        self._forced: int | None = None          # the second stop signal's number
        self._status = 0
        self._tasks: trio.Nursery | None = None

    async def run(self) -> int:
        """Start the processes, keep them, stop them on SIGINT/SIGTERM. Returns the exit status."""
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as tasks:
                self._tasks = tasks
                tasks.start_soon(self._watch_signals, signals)
                async with trio.open_nursery() as slots:
                    await self._start_all(slots)
                tasks.cancel_scope.cancel()
        if self._forced is not None:
            return 128 + self._forced
        if self._status == 0:
            log.info("stopped: every process exited")
        return self._status

    async def _start_all(self, slots: trio.Nursery) -> None:
        """Process 1 first, alone (its failure to start is the server's); then the others."""
        settled = [trio.Event() for _ in range(self._config.processes)]
        listened = [False] * len(settled)
        slots.start_soon(self._keep, 1, settled[0], listened)
        await settled[0].wait()
        if not listened[0]:
            return
        for number in range(2, len(settled) + 1):
            slots.start_soon(self._keep, number, settled[number - 1], listened)
        for event in settled:
            await event.wait()
        if all(listened) and not self._stopping.is_set():
            log.info("qserve listening on http://%s:%s (%d processes, queues at %s)",
                     f"[{self._config.host}]" if ":" in self._config.host else self._config.host,
                     self._port, len(settled), self._config.redacted_backend())

    async def _keep(self, number: int, settled: trio.Event, listened: list[bool]) -> None:
        """Run process ``number`` until the supervisor stops, starting it again when it dies;
        ``settled`` is set once it first listens (``listened[number - 1]``) or when this gives up."""
        failures = 0   # deaths in a row before listening
        delay = 0.0
        try:
            while not self._stopping.is_set():
                child = self._spawn(number)
                if child is None:
                    served, status, lived = False, None, 0.0
                else:
                    try:
                        served = await child.pipe.receive_some(64) != b""
                        if served and not listened[number - 1]:
                            listened[number - 1] = True
                            settled.set()
                        status = await self._exited(child, served)
                        lived = time.monotonic() - child.started
                    finally:
                        child.close()
                if self._stopping.is_set():
                    return
                if not served and not listened[number - 1] and number == 1:
                    self._first_failed(status, child)
                    return
                failures = 0 if served else failures + 1
                if failures >= GIVE_UP_AFTER:
                    log.error("process %d failed to start %d times in a row (the last one %s); giving up: "
                              "stopping all processes", number, failures, _how(status))
                    self._status = 1
                    self._stop()
                    return
                delay = 0.0 if served and lived >= STABLE else min(MAX_DELAY, max(FIRST_DELAY, delay * 2))
                what = (f"process {number} could not be started" if child is None else
                        f"process {number} (pid {child.popen.pid}) {_how(status)}"
                        f"{'' if served else ' before listening'}")
                log.warning("%s; restarting it%s", what, f" in {delay:g} s" if delay else "")
                with trio.move_on_after(delay):
                    await self._stopping.wait()
        finally:
            settled.set()

    def _spawn(self, number: int) -> _Child | None:
        """Start process ``number`` (registered before any checkpoint, so a stop signals it);
        None when the system refuses (logged)."""
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env[SUPERVISOR_ENV] = f"{os.getpid()} {write_end}"
        try:
            popen = subprocess.Popen(self._command, stdin=subprocess.DEVNULL, env=env, pass_fds=(write_end,),
                                     process_group=0)
        except OSError as exc:
            os.close(read_end)
            log.error("cannot start process %d: %s", number, exc.strerror or exc)
            return None
        finally:
            os.close(write_end)
        child = _Child(number, popen, os.pidfd_open(popen.pid), trio.lowlevel.FdStream(read_end),
                       time.monotonic())
        self._running[number] = child
        log.debug("process %d started: pid %d", number, popen.pid)
        return child

    async def _exited(self, child: _Child, served: bool) -> int:
        """Wait for ``child`` (``served``: it said it listens) to exit, reap it; its return code
        (negative: killed by that signal). While stopping, a process that never listened and died of
        the SIGTERM stopped cleanly: it got it before its own handler was in place (still starting
        Python), when the default action, ending it, is all a stop asks of a process that has
        answered nothing."""
        await trio.lowlevel.wait_readable(child.pidfd)
        status = child.popen.wait()
        del self._running[child.number]
        await child.pipe.aclose()
        if self._stopping.is_set() and status != 0 and self._forced is None and not child.killed:
            if not served and status == -signal.SIGTERM:
                log.info("process %d (pid %d) stopped before it listened", child.number, child.popen.pid)
            else:
                log.warning("process %d (pid %d) %s while stopping", child.number, child.popen.pid, _how(status))
                self._status = 1
        return status

    def _first_failed(self, status: int | None, child: _Child | None) -> None:
        """Process 1 could not start: the supervisor exits as that server would have, with its
        status. Its own one line said why (or `_spawn`'s did), unless a signal killed it."""
        if child is not None and status is not None and status < 0:
            log.error("process 1 (pid %d) %s before listening", child.popen.pid, _how(status))
        self._status = status if status is not None and status > 0 else 1
        self._stop()

    async def _watch_signals(self, signals) -> None:
        async for received, sig in numbered(signals):
            if received == 1:
                log.info("received %s: stopping %d processes (send it again to stop them at once)",
                         sig.name, len(self._running))
                self._stop()
            elif received == 2:
                log.warning("received %s again: stopping the processes at once", sig.name)
                self._forced = int(sig)
                self._signal_all(signal.SIGTERM)
                assert self._tasks is not None
                self._tasks.start_soon(self._kill_after, MARGIN)

    def _stop(self) -> None:
        """Stop every process: SIGTERM now, SIGKILL for what is left after the grace period."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._signal_all(signal.SIGTERM)
        assert self._tasks is not None
        self._tasks.start_soon(self._kill_after, self._config.shutdown_timeout + MARGIN)

    def _signal_all(self, signum: int) -> None:
        for child in self._running.values():
            child.popen.send_signal(signum)

    async def _kill_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        for child in self._running.values():
            log.warning("process %d (pid %d) did not stop within %g s: killing it", child.number,
                        child.popen.pid, seconds)
            child.killed = True
            child.popen.kill()
            self._status = 1


def _how(status: int | None) -> str:
    """How a process ended, for a log line."""
    if status is None:
        return "could not be started"
    if status < 0:
        try:
            return f"was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"was killed by signal {-status}"
    return f"exited with status {status}"
