"""The puts of one Redis queue coalesced into one script call: group commit for the Redis backend.

Strategy: a put joins its queue's pending list. When no batch is in flight it sends one itself (it
*leads*): every pending put, up to `MAX_PUTS` of them and `MAX_BYTES` of payload (a larger put
goes alone), in one PUT script, whose reply answers each put in order. Puts that arrive meanwhile
wait; when the reply comes the leader hands the lead to the first of them, which sends the next
batch. A lone put goes at once, as it would alone; under load one round trip and one pass through
coredis serve many puts (a Redis node spent about twice a local node's CPU per put, most of it in
coredis's path of one command). Each put is the script's own step, so a batch changes no answer:
the same checks (dedup window, ended, full) in arrival order, and Redis runs the script atomically.

Cancellation: a put cancelled before its batch was sent is withdrawn, and nothing is stored; once
sent, its outcome is unknown to its client, as for any write cut short. A leader sends under a
shield, because the batch's other puts wait on it; the link's reply timeout bounds that.

Bounds: pending puts are bounded by the requests that make them (each waits for its own answer);
a batch by `MAX_PUTS` and `MAX_BYTES`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import trio

__all__ = ["PutBatcher", "MAX_PUTS", "MAX_BYTES"]

MAX_PUTS = 64              # puts in one script call at most
MAX_BYTES = 1024 * 1024    # payload bytes in one script call at most, unless a single put is larger


class _Put:
    __slots__ = ("args", "size", "woken", "lead", "sent", "reply", "error")

    def __init__(self, args: Sequence, size: int) -> None:
        self.args = args
        self.size = size
        self.woken = trio.Event()   # answered, or handed the lead
        self.lead = False
        self.sent = False
        self.reply = None
        self.error: BaseException | None = None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.reply


class PutBatcher:
    """Coalesces concurrent puts to one queue (module docstring). ``send`` runs the PUT script on
    a batch (each put's arguments, in order) and returns the replies in the same order."""

    def __init__(self, send: Callable[[list[Sequence]], Awaitable[Sequence]]) -> None:
        self._send = send
        self._pending: deque[_Put] = deque()
        self._leading = False
        self.batches = 0      # statistics: script calls, and the puts they carried
        self.puts = 0

    async def put(self, args: Sequence, size: int):
        """One put's reply from the script (its arguments ``args``, ``size`` payload bytes).

        Raises: whatever ``send`` raised for its batch."""
        mine = _Put(args, size)
        self._pending.append(mine)
        if self._leading:
            try:
                await mine.woken.wait()
            except trio.Cancelled:
                if mine.lead:           # handed the lead as it was cancelled: the batch must still go
                    await self._lead(mine)
                elif not mine.sent:     # withdrawn: nothing stored
                    self._pending.remove(mine)
                raise
            if not mine.lead:
                return mine.result()
        await self._lead(mine)
        return mine.result()

    async def _lead(self, mine: _Put) -> None:
        """Send the batch ``mine`` heads, then hand the lead to the first put still pending."""
        self._leading = True
        try:
            with trio.CancelScope(shield=True):
                while not mine.sent:   # `mine` is first in line: one batch, normally
                    await self._flush(self._take())
        finally:
            if self._pending:
                following = self._pending[0]
                following.lead = True
                following.woken.set()
            else:
                self._leading = False

    def _take(self) -> list[_Put]:
        batch: list[_Put] = []
        size = 0
        pending = self._pending
        while pending and len(batch) < MAX_PUTS and (not batch or size + pending[0].size <= MAX_BYTES):
            put = pending.popleft()
            put.sent = True
            size += put.size
            batch.append(put)
        return batch

    async def _flush(self, batch: list[_Put]) -> None:
        self.batches += 1
        self.puts += len(batch)
        try:
            replies = await self._send([put.args for put in batch])
            for put, reply in zip(batch, replies, strict=True):
                put.reply = reply
        except BaseException as exc:
            for put in batch:
                put.error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for put in batch:
                put.woken.set()
