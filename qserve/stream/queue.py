"""The one-shot queue commands of `qserve stream`: info, put, get, delete, trunc.

Strategy: each command is a function ``(args, out) -> exit status`` over a blocking client of the
configured queue; it prints eascmd's lines through `Out` and lets `QueueError` and `CLIError` rise
to `stream.cli.main`, which turns them into one ``[ERROR]`` line. Destructive commands ask first
(``[y/N]``; anything but y, end of input included, declines and exits 0). ``put -f`` never ends
without its summary: after every line, after an error that stops it, and after Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from dataclasses import dataclass

from qserve.stream.out import CLIError, Out, confirm, describe_queue_error, human_size, warn
from qserve.wire.durations import format_seconds
from qserve.stream.settings import client

__all__ = ["cmd_info", "cmd_put", "cmd_get", "cmd_delete", "cmd_trunc", "PROGRESS_EVERY"]

PROGRESS_EVERY = 1000
_ENTRY_ERRORS = (400, 413)  # a put -f line failing with these is counted and skipped


def cmd_info(args: argparse.Namespace, out: Out) -> int:
    with client(args, sink=args.sink) as q:
        attrs = q.attributes()
    out.line("[OK] Attributes: ")
    for key in sorted(attrs):
        out.line(f"{key} : {attrs[key]}")
    out.obj(attributes=dict(sorted(attrs.items())))
    return 0


def _lines(path: str):
    with open(path, "rb") as f:
        for raw in f:
            yield raw.rstrip(b"\n").removesuffix(b"\r")


def _chain(first, rest):
    yield first
    yield from rest


class _Interrupt:
    """SIGINT during ``put -f``: the first one asks to stop after the entry being sent (so every
    count is exact); a second one while that entry still waits for its answer stops at once
    (`KeyboardInterrupt`; that entry's fate is then unknown). Outside the main thread (the CLI
    called from a worker thread) signals cannot be caught and Ctrl-C keeps Python's behaviour.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.requested = False
        self.waiting = False
        self._previous = None

    def _handler(self, signum, frame) -> None:
        if self.requested and self.waiting:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_Interrupt":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@dataclass
class _Tally:
    """What became of the lines of a put: put, refused, never sent, or sent with no answer."""

    total: int = 0
    success: int = 0
    size: int = 0
    not_sent: int = 0
    unknown: int = 0

    @property
    def failed(self) -> int:
        return self.total - self.success - self.unknown

    def counts(self) -> str:
        text = f"Total: {self.total}, success: {self.success}, failed: {self.failed}"
        if self.not_sent:
            text += f", not sent: {self.not_sent}"
        if self.unknown:
            text += f", unknown (sent, no answer): {self.unknown}"
        return text


def _items(args: argparse.Namespace, out: Out):
    if args.file is None:
        return iter([args.data.encode("utf-8")])
    out.line(f"[INFO] Opening data file: {args.file}")
    try:
        items = _lines(args.file)
        first = next(items, None)
    except OSError as exc:
        raise CLIError(f"cannot open {args.file}: {exc.strerror or exc}") from None
    return iter([]) if first is None else _chain(first, items)


def cmd_put(args: argparse.Namespace, out: Out) -> int:
    """Put ``-d DATA`` or every line of ``-f FILE``; the summary is printed however the put ends.

    A refused line (400, 413) is counted as failed and the put goes on; any other error stops it,
    prints the summary, and rises to `main` for its ``[ERROR]`` line. Ctrl-C stops it after the
    entry in flight: summary, a ``[WARN] interrupted`` line, exit status 130.
    """
    from qserve.client import QueueError, QueueTimeout
    tags = dict(args.tags)
    tally = _Tally()
    fatal: QueueError | None = None
    with _Interrupt(args.file is not None) as interrupt:    # held until the summary is out
        with client(args, sink=args.sink) as q:
            items = _items(args, out)
            start = time.monotonic()
            for data in items:
                if interrupt.requested:
                    tally.not_sent += 1
                    break
                tally.total += 1
                try:
                    interrupt.waiting = True
                    index, request_id = q.put(data, tags, priority=args.priority)
                except QueueError as exc:
                    if args.file is None:
                        raise               # a single entry: its error line says it all
                    if exc.status in _ENTRY_ERRORS:
                        warn(f"[ERROR] entry {tally.total}: {describe_queue_error(exc)}")
                        continue
                    # not about this entry (unreachable, 401, ended, full): stop here
                    if getattr(exc, "response_started", False) or isinstance(exc, QueueTimeout):
                        tally.unknown += 1
                    fatal = exc
                    break
                except KeyboardInterrupt:
                    interrupt.requested = True
                    tally.unknown += 1
                    break
                finally:
                    interrupt.waiting = False
                tally.success += 1
                tally.size += len(data)
                out.line(f"[OK] {index} requestId={request_id}")
                out.obj(index=index, request_id=request_id)
                if args.file is not None and tally.total % PROGRESS_EVERY == 0:
                    warn(f"[INFO] {tally.total} lines read, {tally.success} put")
            elapsed = time.monotonic() - start
            tally.not_sent += sum(1 for _ in items)
        return _summary(out, tally, elapsed, interrupt.requested, fatal)


def _summary(out: Out, tally: _Tally, elapsed: float, interrupted: bool, fatal: Exception | None) -> int:
    ended = "interrupted" if interrupted else "stopped" if fatal is not None else "done"
    out.line(f"[INFO] Put data {ended}.")
    out.line(f"Total time cost: {format_seconds(elapsed)}")
    out.line(f"Total size: {human_size(tally.size)}")
    out.line(tally.counts())
    extra = {"not_sent": tally.not_sent, "unknown": tally.unknown, "ended": ended} if ended != "done" else {}
    out.obj(total=tally.total, success=tally.success, failed=tally.failed, bytes=tally.size,
            seconds=round(elapsed, 6), **extra)
    if fatal is not None:
        raise fatal
    if interrupted:
        warn(f"[WARN] interrupted: {tally.success} put, {tally.failed} failed, {tally.not_sent} not sent"
             + (f", {tally.unknown} sent with no answer (it may be stored)" if tally.unknown else ""))
        return 130
    return 1 if tally.failed else 0


def cmd_get(args: argparse.Namespace, out: Out) -> int:
    with client(args, sink=args.sink) as q:
        entries = q.get(index=args.index, length=args.length, timeout=args.timeout,
                        auto_delete=not args.keep, request_id=args.request_id, tags=dict(args.tags) or None)
    if not entries:
        out.line("[INFO] no data")
    for ordinal, entry in enumerate(entries):
        out.entry(ordinal, entry)
    return 0


def cmd_delete(args: argparse.Namespace, out: Out) -> int:
    indexes = args.indexes
    if not confirm(args, out, "Deleting index(es):\n" + " ".join(map(str, indexes))):
        return 0
    with client(args, sink=args.sink) as q:
        q.delete(indexes)
    out.line("[OK] deleted")
    out.obj(deleted=indexes)
    return 0


def cmd_trunc(args: argparse.Namespace, out: Out) -> int:
    if not confirm(args, out, f"trunc stream from index: {args.index}"):
        return 0
    with client(args, sink=args.sink) as q:
        q.truncate(args.index)
    out.line("[OK] truncated")
    out.obj(truncated=args.index)
    return 0
