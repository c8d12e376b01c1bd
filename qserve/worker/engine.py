"""The worker's engine: watch the input queue, run the handler on each entry, put the result into
the sink, then commit the input; drain on request.

Strategy: one trio nursery holds the watch task, one task per entry in hand and a reporter. Before
the watch is opened the queue must be ready: at start-up the worker probes the server (`probe`) with
a plain TCP connect, then asks for the queue's attributes (a 5xx, or a queue the server has fenced off
because it cannot open it, is an outage; a 401 or 404 is a configuration error and ends the
worker). While that fails it logs one WARNING line per attempt (``cannot reach ORIGIN: connection
refused; retrying in 1s``) and waits with exponential backoff (``connect_delay`` doubling up to
``connect_delay_max``), so a worker started before its server, or on a queue being repaired, simply
picks it up. The "watching" line is logged only once the server has accepted the subscription. The
watch has ``window = concurrency``, so the server never hands this worker more than that many
uncommitted entries; a `trio.CapacityLimiter` of the same size bounds the handlers that run at
once (an entry redelivered after a reconnect can briefly make more arrive than can run).

Per entry the effects come in one order: handler -> put the result (tags ``requestId`` and
``ts@source`` copied from the input) -> commit the input. A crash between the put and the commit
leaves a duplicate result, never a lost one. Puts and commits are retried on transient failures
(no answer, 408, 429, 5xx), a bounded number of times.

Drain (`drain()`, e.g. on SIGTERM):
  1. stop starting entries; those waiting for a handler slot are abandoned at once;
  2. let running handlers finish, up to ``drain_seconds`` (`drain(now=True)` cuts this short);
     then cancel the rest (a sync handler's thread is abandoned);
  3. wait for the put + commit of every finished entry;
  4. negative-commit (code ``Shutdown``) the abandoned entries and any that arrived after step 1;
  5. leave the watch.
The watch stays open until step 5 on purpose: while it is open the entries in hand stay assigned
to this worker, so other workers of the group do not start them a second time, and the nacks of
step 4 are recorded on the entries (the server ignores nacks of entries their sender no longer
holds). Entries that arrive after step 1 are only held, not nacked at once: each nack would free a
window slot the server fills again, cycling the queue through a worker that is leaving.

Rule 1: an entry's input is committed only after its result is in the sink.
Rule 2: an entry that has been started is nacked only if its handler did not finish.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from qserve.client import ConnectError, Entry, QueueClient, QueueError, QueueTimeout
from qserve.worker.handler import Done, Failed, Handler, Outcome, Retry, call_handler, one_line
from qserve.worker.probe import is_transient, obstacle

__all__ = ["Worker"]

log = logging.getLogger("qserve.worker")

_RECENT = 1024                 # committed indexes remembered, to re-commit a stale redelivery
_COPIED_TAGS = ("requestId", "ts@source")


class _State(enum.Enum):
    WAITING = "waiting"        # delivered, waiting for a handler slot
    RUNNING = "running"        # the handler is running
    FINISHING = "finishing"    # handler done: putting the result / committing


@dataclass(eq=False)
class _Job:
    entry: Entry
    state: _State = _State.WAITING
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class Worker:
    """Serves one input queue with a handler. Run it once with ``await worker.run()`` (or
    ``nursery.start(worker.run)``); call `drain()` from any task of the same trio run to stop it.

    Args:
        client: the input queue's client; its ``user``/``group`` are the worker's consumer id
            (the group should be the service name). Its sink client is derived with ``sink()``.
        handler: a loaded `Handler`.
        concurrency: entries processed at once; also the watch window.
        drain_seconds: how long running handlers may take to finish after `drain()`.
        summary_interval: seconds between INFO summary lines.
        attempts: tries for a put or a commit that fails transiently.
        retry_delay: first backoff between tries (doubling, at most 5 s).
        connect_delay: at start-up, the first wait after the server could not be reached
            (doubling after each failed attempt, at most ``connect_delay_max``).

    Not task-safe beyond that: `run` once, from one task.
    """

    def __init__(self, client: QueueClient, handler: Handler, *, concurrency: int = 1,
                 drain_seconds: float = 30.0, summary_interval: float = 60.0, attempts: int = 4,
                 retry_delay: float = 0.5, connect_delay: float = 1.0, connect_delay_max: float = 30.0) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if drain_seconds < 0 or summary_interval <= 0 or attempts < 1 or retry_delay < 0:
            raise ValueError("drain_seconds >= 0, summary_interval > 0, attempts >= 1, retry_delay >= 0")
        if not 0 < connect_delay <= connect_delay_max:
            raise ValueError("0 < connect_delay <= connect_delay_max")
        self.client = client
        self.sink = client.sink()
        self.handler = handler
        self.concurrency = concurrency
        self.drain_seconds = drain_seconds
        self.summary_interval = summary_interval
        self._attempts = attempts
        self._retry_delay = retry_delay
        self._connect_delay = connect_delay
        self._connect_delay_max = connect_delay_max
        self._connecting = trio.CancelScope()        # the wait for the subscription; a drain cancels it
        self._limiter = trio.CapacityLimiter(concurrency)
        self._threads = trio.CapacityLimiter(concurrency)
        self._jobs: dict[int, _Job] = {}            # entries in hand, by index
        self._active = 0                             # job tasks alive (a released job may still nack)
        self._lot = trio.lowlevel.ParkingLot()       # woken whenever a job changes state or ends
        self._recent: deque[int] = deque(maxlen=_RECENT)
        self._recent_set: set[int] = set()
        self._abandoned: list[int] = []              # started or waiting, not finished (drain)
        self._late: dict[int, Entry] = {}            # arrived after the drain began
        self._draining = False
        self._late_closed = False
        self._drain_requested = trio.Event()
        self._grace = trio.CancelScope()
        self._stats = {"processed": 0, "failed": 0, "retried": 0, "returned": 0, "errors": 0}

    # ------------------------------------------------------------------------------ control
    def drain(self, *, now: bool = False) -> None:
        """Stop taking entries, finish those in hand, return the rest, then make `run` return.

        Args:
            now: do not wait for running handlers (a second SIGTERM): cancel them and return
                their entries at once.
        """
        self._drain_requested.set()
        self._connecting.cancel()
        if now:
            self._grace.cancel()

    def statistics(self) -> dict[str, int]:
        """Counters: ``processed`` (inputs committed with a result, error results included),
        ``failed`` (error results), ``retried`` (Retryable nacks), ``returned`` (nacked at
        shutdown), ``errors`` (puts/commits/nacks that failed for good), ``in_hand``, ``running``."""
        running = sum(1 for job in self._jobs.values() if job.state is _State.RUNNING)
        return {**self._stats, "in_hand": len(self._jobs), "running": running}

    @property
    def consumer(self) -> str:
        return f"{self.client.group}.{self.client.user}"

    # -------------------------------------------------------------------------------- run
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Work until `drain()` completes. Reports started once the server has accepted the
        subscription (or a drain came first: then it returns at once, nothing was in hand).

        Raises:
            QueueError: the first watch handshake was refused (401 bad token, 404 unknown queue).
        """
        log.info("worker %s starting: queue %s, handler %s, concurrency %d", self.consumer,
                 self.client.url, self.handler.name, self.concurrency)
        try:
            async with trio.open_nursery() as nursery:
                with self._connecting:
                    await nursery.start(self._watch, nursery)
                task_status.started()
                if self._connecting.cancelled_caught:
                    log.info("worker %s: stopped before the server accepted the subscription", self.consumer)
                    return
                nursery.start_soon(self._report)
                await self._drain_requested.wait()
                await self._drain()
                nursery.cancel_scope.cancel()    # leave the watch; stop the reporter
        finally:
            with trio.CancelScope(shield=True):
                await self.sink.aclose()
            log.info("worker %s stopped: %s", self.consumer, self._summary())

    async def _watch(self, nursery: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe (retrying with backoff until the server is there), then hand entries to jobs.
        Reports started once the server has accepted the subscription."""
        delay = self._connect_delay
        while True:
            reason = await obstacle(self.client)
            if reason is None:
                async with self.client.watch(index=0, window=self.concurrency, auto_commit=False) as watcher:
                    if watcher.connects:         # the first handshake succeeded (else it retries alone)
                        log.info("worker %s watching %s (window %d)", self.consumer, self.client.url,
                                 self.concurrency)
                        task_status.started()
                        async for entry in watcher:
                            self._accept(entry, nursery)
                        return
                reason = f"cannot subscribe to {self.client.url}: the server did not accept the watch"
            log.warning("%s; retrying in %gs", reason, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, self._connect_delay_max)

    def _accept(self, entry: Entry, nursery: trio.Nursery) -> None:
        index = entry.index
        if index in self._jobs:
            return                                # redelivered after a reconnect; still in hand
        if index in self._recent_set:             # a stale redelivery of a committed entry
            nursery.start_soon(self._retrying, "commit", self.client.commit, [index])
            return
        if self._draining:
            if not self._late_closed:
                self._late[index] = entry         # never started; nacked at the end of the drain
            return
        job = self._jobs[index] = _Job(entry)
        self._active += 1
        nursery.start_soon(self._run_job, job)

    async def _run_job(self, job: _Job) -> None:
        try:
            outcome: Outcome | None = None
            with job.scope:
                async with self._limiter:
                    if not self._draining:
                        job.state = _State.RUNNING
                        self._lot.unpark_all()
                        outcome = await call_handler(self.handler, job.entry.data, dict(job.entry.tags),
                                                     thread_limiter=self._threads)
            if outcome is None:
                self._abandoned.append(job.entry.index)
                return
            job.state = _State.FINISHING
            self._lot.unpark_all()
            await self._finish(job, outcome)
        finally:
            self._release(job)
            self._active -= 1
            self._lot.unpark_all()

    def _release(self, job: _Job) -> None:
        """The entry is no longer in hand: from now on a delivery of its index is a new one."""
        if self._jobs.get(job.entry.index) is job:
            del self._jobs[job.entry.index]
            self._lot.unpark_all()

    # ------------------------------------------------------------------------- per entry
    async def _finish(self, job: _Job, outcome: Outcome) -> None:
        entry = job.entry
        index = entry.index
        if isinstance(outcome, Retry):
            log.debug("entry %d: handler asked for a retry (%s)", index, outcome.code)
            self._release(job)     # the redelivery may arrive before the nack's answer does
            if await self._nack([index], outcome.code, outcome.reason):
                self._stats["retried"] += 1
            return
        tags = {k: entry.tags[k] for k in _COPIED_TAGS if k in entry.tags}
        if isinstance(outcome, Done):
            body = outcome.body
            if outcome.content_type:
                tags["Header:Content-Type"] = outcome.content_type
        else:
            assert isinstance(outcome, Failed)
            log.warning("handler %s failed on entry %d (requestId %s): %s", self.handler.name, index,
                        entry.tags.get("requestId"), outcome.reason)
            body = outcome.body
            tags.update(lastCode=outcome.code, lastReason=outcome.reason)
        stored = await self._put_result(index, body, tags)
        if stored is None:
            self._release(job)
            await self._nack([index], "SinkError", "the result could not be stored")
            return
        if await self._retrying("commit", self.client.commit, [index]):
            self._stats["processed"] += 1
            self._stats["failed"] += isinstance(outcome, Failed) or stored == "replaced"
            if len(self._recent) == self._recent.maxlen:
                self._recent_set.discard(self._recent[0])
            self._recent.append(index)
            self._recent_set.add(index)

    async def _put_result(self, index: int, body: bytes, tags: dict[str, str]) -> str | None:
        """Put a result; if the sink refuses it for good (413, 409, ...), put an error result in
        its place so that whoever waits on the requestId gets an answer.

        Returns:
            "stored", "replaced" (by an error result), or None when nothing could be stored.
        """
        try:
            await self._retrying("put", self.sink.put, body, tags, quiet=True)
            return "stored"
        except QueueError as exc:
            if is_transient(exc):
                log.error("entry %d: result not stored (%s); returning the entry", index, exc)
                self._stats["errors"] += 1
                return None
            refused = exc
        reason = one_line(f"result refused by the sink: {refused}")
        error_tags = {k: v for k, v in tags.items() if k in _COPIED_TAGS}
        error_tags.update(lastCode=str(refused.status), lastReason=reason)
        log.warning("entry %d: %s; storing an error result instead", index, reason)
        try:
            await self._retrying("put", self.sink.put, reason.encode(), error_tags, quiet=True)
            return "replaced"
        except QueueError as exc:
            log.error("entry %d: error result not stored either (%s); returning the entry", index, exc)
            self._stats["errors"] += 1
            return None

    async def _retrying(self, what: str, fn: Callable[..., Awaitable[object]], *args, quiet: bool = False) -> bool:
        """Call `fn(*args)`, retrying transient failures with backoff. Returns True on success;
        on a final failure logs it and returns False, or re-raises it when `quiet`."""
        for attempt in range(1, self._attempts + 1):
            try:
                await fn(*args)
                return True
            except QueueError as exc:
                last = exc
                if not is_transient(exc) or attempt == self._attempts:
                    break
                log.debug("%s failed (%s); try %d of %d", what, exc, attempt, self._attempts)
            await trio.sleep(min(self._retry_delay * 2 ** (attempt - 1), 5.0))
        if quiet:
            raise last
        log.error("%s of %s failed: %s", what, args[-1], last)
        self._stats["errors"] += 1
        return False

    async def _nack(self, indexes: list[int], code: str, reason: str) -> bool:
        """Negative commit. Retried only when the request surely did not reach the server: a
        repeated nack of an entry already handed to another worker would take it from that one."""
        for attempt in range(1, self._attempts + 1):
            try:
                await self.client.negative(indexes, code=code, reason=reason)
                return True
            except QueueError as exc:
                unsent = (isinstance(exc, ConnectError) and not exc.response_started
                          and not isinstance(exc, QueueTimeout))
                if not unsent or attempt == self._attempts:
                    log.error("negative commit (%s) of %s failed: %s", code, indexes, exc)
                    self._stats["errors"] += 1
                    return False
            await trio.sleep(min(self._retry_delay * 2 ** (attempt - 1), 5.0))
        return False

    # ------------------------------------------------------------------------------ drain
    async def _wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._lot.park()

    def _count(self, state: _State) -> int:
        return sum(1 for job in self._jobs.values() if job.state is state)

    async def _drain(self) -> None:
        self._draining = True
        log.info("worker %s draining: %d running, %d waiting; up to %gs for running handlers",
                 self.consumer, self._count(_State.RUNNING), self._count(_State.WAITING), self.drain_seconds)
        for job in self._jobs.values():
            if job.state is _State.WAITING:
                job.scope.cancel()
        self._grace.deadline = min(self._grace.deadline, trio.current_time() + self.drain_seconds)
        with self._grace:
            await self._wait_until(lambda: self._count(_State.RUNNING) == 0)
        cut = [job for job in self._jobs.values() if job.state is not _State.FINISHING]
        running = sum(1 for job in cut if job.state is _State.RUNNING)
        if running:
            log.warning("worker %s: drain time is up; cancelling %d handlers", self.consumer, running)
        for job in cut:
            job.scope.cancel()
        await self._wait_until(lambda: self._active == 0)        # puts, commits and nacks in progress
        self._late_closed = True
        unfinished = sorted(set(self._abandoned) | set(self._late))
        if unfinished and await self._nack(unfinished, "Shutdown", "the worker is shutting down"):
            self._stats["returned"] += len(unfinished)
        log.info("worker %s drained: %d entries returned to the queue", self.consumer, len(unfinished))

    # ----------------------------------------------------------------------------- report
    def _summary(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.statistics().items())

    async def _report(self) -> None:
        while True:
            await trio.sleep(self.summary_interval)
            log.info("worker %s: %s", self.consumer, self._summary())
