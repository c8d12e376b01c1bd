"""Watch: push a queue's entries to consumers over WebSocket or a length-delimited HTTP stream.

Strategy: the group logic (who gets which entry, windows, redelivery) is the queue's backend's
(`backends.base.QueueBackend`: attach, deliver, take, sent, release). This module is the thin trio
edge around it: one `Session` per watching connection attaches a consumer, then loops *deliver a
batch -> send frames*, and sleeps on its own wake event when the backend has nothing for it. Auto-commit deletes each batch and sends it once the
delete is durable, the first thing after its round (see `Session._pump_auto`); while it hands a
batch out, a put's new entry is taken for it in the put's own step (`Session.pretake`).
`WatchService.wake` decides whom a change concerns: a put's new entry wakes one
eligible consumer per group (free slots, start and tag filter match; round robin), any other
change wakes every consumer with free slots; a consumer with a full window is never woken, and
`WatchService.fallback` wakes every session every `WAKE_FALLBACK` seconds, which bounds the cost of
any missed wake-up. A reader task drains client frames (trio-websocket answers pings)
and notices the disconnect; a keep-alive task pings a silent client and drops it when no pong
comes. Whatever ends a session (disconnect, replacement by the same consumer id, shutdown),
`detach` gives its uncommitted entries back to its group at once.

Shutdown: the edge cancels every watch (WebSocket close 1001, a streamed watch's body ends). An
auto-commit batch that is already deleted has no way back into the queue, so it is handed out even
then: from its delete to its last frame written it runs shielded (`Session._handing_out`), and a
cancelled session takes no further batch. The shield is bounded: a write by the edge's
``request_timeout`` (what the HTTP edge allows any write), and once `WatchService.shutdown` is
called by its own bound (at most `CLOSE_GRACE`); `WatchService.abort` cuts it at once.

Counting: a batch's frames, once written, are counted as deliveries (`server.meters`: redeliveries
and the time from put to first delivery too), the same for every backend. The delivery policies'
count (``max_deliveries``, the backoff) is the backend's: taken when an entry is handed out, so a
negative commit answering its frame always finds it counted, and taken back at `release` for the
frames that never left (`Session.unwritten`).

Bounds: frames in flight per socket are bounded by the consumer's window (manual commit: entries
held; auto-commit: entries handed out and not yet written), frames encoded ahead by the backend's
read ahead (the local log's: 64 KiB of entries); client messages are bounded by the edge's
`max_message_size` and message queue.
"""

from __future__ import annotations

import logging
import math

import trio
import trio_websocket

from qserve.core import events as ev
from qserve.core.errors import QServeError
from qserve.wire import framing, names, protobuf
from qserve.core.events import ConsumerSpec, QueueRef
from qserve.backends.base import QueueBackend, StoredEntry, Taken
from qserve.server.http import Response
from qserve.server.meters import Meters

__all__ = ["WatchService", "KEEPALIVE_INTERVAL", "KEEPALIVE_TIMEOUT"]

log = logging.getLogger("qserve")

KEEPALIVE_INTERVAL = 20.0   # seconds of client silence before the server pings
KEEPALIVE_TIMEOUT = 20.0    # seconds to wait for the pong before dropping the consumer
WAKE_FALLBACK = 1.0         # a sleeping session polls at least this often
CLOSE_GRACE = 2.0           # bound on finishing a WebSocket closing handshake
SEND_BATCH_BYTES = 256 * 1024   # frames of one poll are written together up to this many bytes


def _sole_error(group: BaseExceptionGroup) -> BaseException:
    """The first error of a session's task group that is not a cancellation."""
    for exc in _leaves(group):
        if not isinstance(exc, trio.Cancelled):
            return exc
    return group


def _leaves(exc: BaseException):
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


class Session:
    """One attached consumer on one queue; `run()` returns when it is over."""

    def __init__(self, queue: QueueBackend, op: ev.Watch, write_bound: float, meters: Meters) -> None:
        self.queue = queue
        self._meters = meters
        self._write_bound = write_bound               # the edge's bound on one write (request_timeout)
        self.op = op
        self.spec = ConsumerSpec(group=op.identity.group, user=op.identity.user, window=op.window,
                                 auto_commit=op.auto_commit, start=op.start, tags=op.tags)
        self.cancel_scope = trio.CancelScope()
        self.frames_sent = 0
        # manual commit: the indexes of the batch in hand whose frames are not written yet (in
        # send order); what is left when the session ends counts no delivery (`release`)
        self.unwritten: list[int] = []
        self._wake = trio.Event()
        self._tags = dict(op.tags)
        self._stopping = False                    # take no further batch (shutdown)
        self._stop_by = math.inf                  # shutdown's bound on handing out a batch in hand
        self._handing_out: trio.CancelScope | None = None   # the shield of a deleted batch's write
        # auto-commit: batches taken for this session in a put's step (`pretake`), or the error that
        # taking one met; bounded by the window, like every batch taken
        self._pretaken: list[Taken | QServeError] = []
        # manual commit: the next window's frames, encoded while the loop had nothing else to do
        # (`_encode_ahead`; index -> (entry, its tags, frame)), at most a window's
        self._frames: dict[int, tuple[StoredEntry, object, bytes]] = {}
        self._idle: trio.CancelScope | None = None   # the wait for an idle loop, which a wake-up cuts

    def stop(self, by: float) -> None:
        """Shutdown: take nothing more; a batch in hand must be written by ``by`` (trio clock)."""
        self._stopping = True
        self._stop_by = min(self._stop_by, by)
        if self._handing_out is not None:
            self._handing_out.deadline = min(self._handing_out.deadline, by)
        self.wake()

    def abort(self) -> None:
        """Stop at once, a batch in hand included (it is lost: the process is being cut)."""
        self.stop(-math.inf)
        if self._handing_out is not None:
            self._handing_out.cancel()

    def wake(self) -> None:
        self._wake.set()
        if self._idle is not None:
            self._idle.cancel()

    def pretake(self) -> None:
        """Auto-commit, a put's step (`WatchService.wake`): while this session hands a batch out,
        take its next batch here and now, so that the delete is written before the put waits for
        its fsync round and the same round covers both; taken later by the session, after that
        round had begun, the delete and the frame waited for the next one (a quarter of the entries
        at 1,700 puts/s; put -> receive p50 1.07-1.12 -> 0.75-0.80 ms). Only inside the hand-out's shield
        (`_handing_out`), which writes whatever this session holds, and never once it is stopping
        or cancelled. A failure to take is raised by the session at its next batch, as its own
        take's would be."""
        take_now = getattr(self.queue, "take_now", None)
        if take_now is None or self._handing_out is None or self._stopping or self.cancel_scope.cancel_called:
            return
        try:
            taken = take_now(self.consumer_id)
        except QServeError as exc:
            self._pretaken.append(exc)
            return
        if taken is not None:
            self._pretaken.append(taken)

    def _next_pretaken(self) -> Taken | None:
        """The oldest batch `pretake` took, or None; raises what taking one met."""
        if not self._pretaken:
            return None
        taken = self._pretaken.pop(0)
        if isinstance(taken, QServeError):
            raise taken
        return taken

    def accepts(self, entry: StoredEntry) -> bool:
        """Could this consumer take `entry` (start position and tag filter)?"""
        if 0 < self.op.start and entry.index < self.op.start:
            return False
        tags = entry.tags
        return all(tags.get(k) == v for k, v in self._tags.items())

    @property
    def consumer_id(self) -> str:
        return self.spec.id

    async def pump(self, send) -> None:
        """Deliver entries forever through ``await send(frames)``: a list of encoded frames of one
        poll, written together, at most `SEND_BATCH_BYTES` of them unless a single frame is larger.

        Manual commit, a full window: once the loop has nothing else to do (the backend's
        ``read_ahead``, if any), the next window's entries are read and their frames encoded for
        the commit that frees it: work moved from the commit's turn, where it competed with the
        fsync for the CPU, into the consumer's (`watch_rate.py`: higher in 7 of 8 alternating
        pairs, twice). A wake-up cuts the wait; a frame encoded ahead is used only for the same
        entry object with the same tags (a negative commit's notes since make it stale)."""
        if self.op.auto_commit:
            await self._pump_auto(send)
            return
        deliver, cid = self.queue.deliver, self.consumer_id
        read_ahead = getattr(self.queue, "read_ahead", None)
        ahead = False
        while True:
            self._wake = trio.Event()        # a wake-up from here on is not lost
            entries = await deliver(cid)
            if not entries:
                if read_ahead is not None and not ahead:   # once per delivery, which alone fills a window
                    ahead = True
                    reading = read_ahead(cid)   # None: nothing to read ahead now
                    if reading is not None:
                        with trio.CancelScope() as self._idle:   # until a wake-up (`wake`)
                            self._encode_ahead(await reading)
                        self._idle = None
                        continue
                await self._wake.wait()      # or `WatchService.fallback`'s periodic wake-up
                continue
            ahead = False
            self.unwritten = [e.index for e in entries]
            await self._send_frames(send, entries)

    async def _pump_auto(self, send) -> None:
        """Auto-commit: a batch's frames go out once its delete is durable, the first thing after
        its round; the next batch is taken after the write. A put that comes while a batch is
        handed out is taken in its own step (`pretake`) and one that comes while the session
        waits is taken when it wakes, before the flusher's round starts: either way its delete
        joins its put's round. A take between the round and the write covered nothing more and
        delayed every frame by a poll of the dispatcher (put -> receive p50 at 2,600 puts/s lower
        in 12 of 16 alternating pairs without it). Bound: the batch in hand and those taken for
        it meanwhile hold at most the window together (`Dispatcher.sent` frees the slots once
        the frames are written), which is also what a dying socket can lose.

        Cancelled (shutdown, replacement, a dead keep-alive), the session still writes the batches
        it has deleted and takes no more (module docstring); a write that cannot finish in time
        ends the session with `trio.BrokenResourceError` (the stream may hold a partial frame)."""
        queue, cid = self.queue, self.consumer_id
        write_bound = self._write_bound
        ahead: Taken | None = None
        while True:
            if ahead is None:
                ahead = self._next_pretaken()   # taken for us during the last hand-out: ours to write
            if ahead is None:
                await trio.lowlevel.checkpoint_if_cancelled()   # nothing in hand: may end here
                if self._stopping:
                    await trio.sleep_forever()   # until the edge cancels the watch
                self._wake = trio.Event()    # a wake-up from here on is not lost
                ahead = await queue.take(cid)
                if ahead is None:
                    await self._wake.wait()
                    continue
            mark, entries, indexes = ahead
            with trio.CancelScope(shield=True, deadline=self._stop_by) as shield:
                self._handing_out = shield
                try:
                    if entries:
                        # the frame goes out only once its delete is durable: it can never come
                        # back; ahead of the same round's put answers (the latency a watcher
                        # sees). A failed fsync raises here and ends the session before anything
                        # else is deleted.
                        await queue.wait_durable(mark, first=True)
                    ahead = self._next_pretaken()
                    if entries:
                        shield.deadline = min(shield.deadline, trio.current_time() + write_bound)
                        await self._send_frames(send, entries)
                finally:
                    self._handing_out = None
            if shield.cancelled_caught:
                raise trio.BrokenResourceError("watch frames could not be written in time")
            queue.sent(cid, indexes)

    def _encode_ahead(self, entries: list[StoredEntry]) -> None:
        tags_of, encode, index_only = self.queue.tags_of, protobuf.encode_frame, self.op.index_only
        self._frames = {e.index: (e, t, encode(e.index, t, b"" if index_only else e.data))
                        for e in entries for t in (tags_of(e),)}

    async def _send_frames(self, send, entries: list[StoredEntry]) -> None:
        batch: list[bytes] = []
        size = first = 0
        tags_of, encode, index_only = self.queue.tags_of, protobuf.encode_frame, self.op.index_only
        frames = self._frames
        for n, entry in enumerate(entries):   # one write per SEND_BATCH_BYTES of frames (a big frame alone)
            tags = tags_of(entry)
            c = frames.pop(entry.index, None) if frames else None
            if c is not None and c[0] is entry and c[1] is tags:
                frame = c[2]
            else:
                frame = encode(entry.index, tags, b"" if index_only else entry.data)
            if batch and size + len(frame) > SEND_BATCH_BYTES:
                await send(batch)
                self._written(entries[first:n])
                batch, size, first = [], 0, n
            batch.append(frame)
            size += len(frame)
        if batch:
            await send(batch)
            self._written(entries[first:] if first else entries)

    def _written(self, entries: list[StoredEntry]) -> None:
        """These entries' frames are written: delivered (`server.meters`)."""
        del self.unwritten[:len(entries)]    # the batch's frames go out in order
        self.frames_sent += len(entries)
        self._meters.delivered(self.queue.ref, self.spec.group, entries, held=not self.op.auto_commit)


class WatchService:
    """Owns the watch sessions of every queue. Used from the trio thread only."""

    def __init__(self, write_bound: float, meters: Meters) -> None:
        self._write_bound = write_bound   # seconds a write of frames may take (the edge's request_timeout)
        self._meters = meters             # where sessions count their deliveries
        self._sessions: dict[tuple[object, str], Session] = {}
        self._by_queue: dict[object, dict[str, Session]] = {}   # queue ref -> consumer id -> session
        self._turn = 0                                           # round robin among a group's members

    def statistics(self) -> dict:
        return {"sessions": len(self._sessions)}

    def shutdown(self, grace: float) -> None:
        """The server is draining: no session takes another entry, and a batch an auto-commit
        session has deleted must be written within ``min(grace, CLOSE_GRACE)`` seconds. (The edge
        then cancels the sessions: WebSocket close 1001, streamed watches end.)"""
        by = trio.current_time() + min(grace, CLOSE_GRACE)
        for session in list(self._sessions.values()):
            session.stop(by)

    def abort(self) -> None:
        """The server stops at once: cut even the batches being written."""
        for session in list(self._sessions.values()):
            session.abort()

    def wake(self, queue: QueueBackend, entry: StoredEntry | None) -> bool:
        """A queue's ``on_change``: wake the sessions a change concerns (see the module docstring).
        True when it woke one."""
        sessions = self._by_queue.get(queue.ref)
        if not sessions:
            return False
        free = queue.wants()
        woke = False
        if entry is None:
            for cid in free:
                session = sessions.get(cid)
                if session is not None:
                    session.wake()
                    woke = True
            return woke
        by_group: dict[str, list[Session]] = {}
        for cid in free:
            session = sessions.get(cid)
            if session is not None and session.accepts(entry):
                by_group.setdefault(session.spec.group, []).append(session)
        self._turn += 1
        for members in by_group.values():
            chosen = members[self._turn % len(members)]
            if chosen.op.auto_commit:
                chosen.pretake()
            chosen.wake()
        return bool(by_group)

    def evict(self, queue: QueueRef, consumer_id: str) -> None:
        """The backend says this consumer is not ours any more (the same id attached through
        another node, or this node's lease on it ran out): close its session as a replaced one."""
        session = self._sessions.get((queue, consumer_id))
        if session is not None:
            session.cancel_scope.cancel()

    async def fallback(self) -> None:
        """Wake every session each `WAKE_FALLBACK` seconds (bounds the cost of a missed wake-up).
        One timer for all of them: a deadline per sleep made every poll of every session pay for
        a timer of its own (README, "Development", has the figure)."""
        while True:
            await trio.sleep(WAKE_FALLBACK)
            for session in list(self._sessions.values()):
                session.wake()

    async def _open(self, queue: QueueBackend, op: ev.Watch) -> Session:
        session = Session(queue, op, self._write_bound, self._meters)
        key = (op.queue, session.consumer_id)
        old = self._sessions.get(key)
        self._sessions[key] = session   # from here a replaced session's close leaves the consumer alone
        self._by_queue.setdefault(queue.ref, {})[session.consumer_id] = session
        try:
            if old is not None:  # the same consumer reconnected: the stale socket goes, its entries back
                old.cancel_scope.cancel()
                await queue.release(old.consumer_id, old.unwritten)
            await queue.attach(session.spec)
        except BaseException:
            self._unregister(session)
            raise
        log.debug("watch %s on %s attached", session.consumer_id, queue.ref.name,
                  extra={"queue": queue.ref.name, "consumer": session.consumer_id})
        return session

    def _unregister(self, session: Session) -> bool:
        """Forget ``session``; False if another session of its consumer replaced it."""
        key = (session.op.queue, session.consumer_id)
        if self._sessions.get(key) is not session:
            return False
        del self._sessions[key]
        members = self._by_queue[session.op.queue]
        del members[session.consumer_id]
        if not members:
            del self._by_queue[session.op.queue]
        return True

    async def _close(self, session: Session) -> None:
        if self._unregister(session):
            await session.queue.release(session.consumer_id, session.unwritten)
            log.debug("watch %s on %s detached", session.consumer_id, session.queue.ref.name,
                      extra={"queue": session.queue.ref.name, "consumer": session.consumer_id})

    # -- WebSocket ---------------------------------------------------------------------------
    async def websocket(self, queue: QueueBackend, op: ev.Watch, upgrade) -> None:
        """Serve watch ``op`` on ``queue`` over ``upgrade`` (the app's WebSocket handler calls it):
        errors before `accept()` refuse the handshake."""
        session = await self._open(queue, op)
        try:
            with session.cancel_scope:
                ws = await upgrade.accept()
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._read_until_closed, ws, nursery.cancel_scope)
                        nursery.start_soon(self._keepalive, ws, nursery.cancel_scope)
                        try:
                            await session.pump(upgrade.send_messages)
                        except (trio_websocket.ConnectionClosed, trio.BrokenResourceError,
                                trio.ClosedResourceError):
                            # the reader ends the nursery once trio-websocket has finished the
                            # closing handshake (echoed the client's close); bounded here
                            nursery.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE
                except BaseExceptionGroup as group:
                    # one session, one cause: the edge maps a plain error to its close code
                    raise _sole_error(group) from None
        finally:
            await self._close(session)

    @staticmethod
    async def _read_until_closed(ws, scope: trio.CancelScope) -> None:
        try:
            while True:
                await ws.get_message()   # clients send nothing but pings (answered by trio-websocket)
        except trio_websocket.ConnectionClosed:
            pass
        scope.cancel()

    @staticmethod
    async def _keepalive(ws, scope: trio.CancelScope) -> None:
        try:
            while True:
                await trio.sleep(KEEPALIVE_INTERVAL)
                with trio.move_on_after(KEEPALIVE_TIMEOUT) as waited:
                    await ws.ping()
                if waited.cancelled_caught:
                    log.info("watcher at %s gave no pong in %.0fs; dropping it", ws.remote, KEEPALIVE_TIMEOUT)
                    break
        except trio_websocket.ConnectionClosed:
            pass
        scope.cancel()

    # -- HTTP streaming watch (PROTOCOL.md 5.12) ----------------------------------------------
    async def http_stream(self, queue: QueueBackend, op: ev.Watch) -> Response:
        async def stream(send) -> None:
            session = await self._open(queue, op)
            try:
                with session.cancel_scope:
                    await session.pump(lambda frames: send(b"".join(map(framing.length_delimited, frames))))
            finally:
                await self._close(session)

        return Response(200, headers=[("Content-Type", names.PROTOBUF)], stream=stream)
