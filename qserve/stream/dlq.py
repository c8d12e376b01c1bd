"""`qserve stream dlq list|show|replay|purge`: the configured service's dead-letter queue.

Strategy: the dead-letter queue ``.../SERVICE/dlq`` (`qserve.core.policy`, ``max_deliveries``) is
an ordinary queue, so list, show and purge use the HTTP API only (get without deleting, delete,
truncate, attributes) and work against any backend that keeps dead letters. A dead letter is
recognised by its tags (`core.policy.DLQ_TAGS`): ``dlq.queue`` (``S`` or ``S/sink``) and
``dlq.index`` name where it came from, ``dlq.requestId`` its requestId.

Replay asks the server to move each entry back (qserve's own ``POST .../S/dlq?_replay_=true``,
one request per entry so that one refused entry does not stop the others): the server puts it into
its queue with its data, its own tags (without the bookkeeping: ``dlq.*``, ``lastCode``,
``lastReason``, ``ts@*``), its ``_path_``, its requestId and its priority, under a new index, and
deletes it from the dead-letter queue, in one atomic step on Redis and crash-safely on the local
backend (never in neither queue, never stored twice, a replay repeated after a crash included). A
dedup window that still holds the requestId of the entry's first put is re-keyed to the new index:
the replay stores the entry, and a later put of that requestId is the replay's duplicate.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from qserve.stream.out import CLIError, Out, confirm, describe_queue_error, warn
from qserve.stream.settings import settings
from qserve.wire import names

if TYPE_CHECKING:
    from qserve.client import BlockingQueueClient, Entry
    from qserve.client.http import QueueURL

__all__ = ["cmd_dlq", "dlq_urls", "Letter"]

PAGE = 500                   # entries per get when reading through the queue (the server allows 1000)
# a replay refused for its entry (not a dead letter, gone meanwhile, its queue ended, a sink on a
# Redis Cluster): that entry fails, the others go on; any other refusal stops the replay
_ENTRY_ERRORS = (400, 404, 409, 501)


# ------------------------------------------------------------------------------------ pure parts

def dlq_urls(url: str) -> tuple[QueueURL, QueueURL]:
    """``(service, dead-letter queue)`` URLs of the service a queue URL names (its input, sink or
    dead-letter queue): ``.../api/predict/S[/sink|/dlq]`` -> ``.../api/predict/S``, ``.../S/dlq``.

    Raises: ValueError for a URL that is not http(s).
    """
    from qserve.client.http import QueueURL
    parsed = QueueURL.parse(url)
    path = parsed.path.rstrip("/")
    for suffix in ("/sink", "/dlq"):
        if path.endswith(suffix) and path[: -len(suffix)] + "/" != names.MOUNT:
            path = path[: -len(suffix)]
            break
    return replace(parsed, path=path or "/"), replace(parsed, path=path + "/dlq")


@dataclass(frozen=True)
class Letter:
    """One entry of a dead-letter queue and where it came from (None where a tag is missing)."""

    entry: Entry
    queue: str | None
    queue_index: int | None
    request_id: str | None
    deliveries: str | None
    group: str | None
    last_code: str | None
    last_reason: str | None

    @classmethod
    def of(cls, entry: Entry) -> "Letter":
        tags = entry.tags
        raw_index = tags.get("dlq.index", "")
        return cls(entry, tags.get("dlq.queue") or None, int(raw_index) if raw_index.isdigit() else None,
                   tags.get("dlq.requestId") or tags.get("requestId") or None, tags.get("dlq.deliveries"),
                   tags.get("dlq.group"), tags.get("lastCode"), tags.get("lastReason"))

    @property
    def index(self) -> int:
        return self.entry.index

    def row(self) -> tuple[str, ...]:
        """The `list` columns (see `_COLUMNS`), ``-`` for what is missing, one line each."""
        cells = (self.index, self.queue, self.queue_index, self.request_id, self.deliveries, self.group,
                 self.last_code, self.last_reason)
        return tuple("-" if c is None or c == "" else _one_line(str(c)) for c in cells)

    def as_json(self) -> dict:
        return {"index": self.index, "queue": self.queue, "queue_index": self.queue_index,
                "request_id": self.request_id,
                "deliveries": int(self.deliveries) if (self.deliveries or "").isdigit() else self.deliveries,
                "group": self.group, "last_code": self.last_code, "last_reason": self.last_reason,
                "bytes": len(self.entry.data)}


_COLUMNS = ("DLQ", "QUEUE", "INDEX", "REQUEST_ID", "DELIVERIES", "GROUP", "LAST_CODE", "LAST_REASON")


def _one_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _table(letters: list[Letter]) -> list[str]:
    rows = [_COLUMNS, *(letter.row() for letter in letters)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in rows]


# ------------------------------------------------------------------------------------ reading

class _Session:
    """The clients of one command: the dead-letter queue and, for replay, its service's queues
    (each a `BlockingQueueClient`, closed with the ``stack``). Used from one thread."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args = args
        self.stack = stack
        self.settings = settings(args)
        self.base, self.dlq_url = dlq_urls(self.settings["url"])
        self.dlq = self.client(self.dlq_url)

    def client(self, url: QueueURL) -> BlockingQueueClient:
        from qserve.client import BlockingQueueClient
        s = self.settings
        return self.stack.enter_context(BlockingQueueClient(
            str(url), token=s.get("token"), group=s["group"], user=s["user"], timeout=self.args.request_timeout))

    @property
    def name(self) -> str:
        return self.dlq_url.path

    def read(self, start: int, limit: int | None = None, last: int | None = None) -> Iterator[Entry]:
        """The entries from index ``start`` on (0: the head), at most ``limit``, none above ``last``."""
        count = 0
        while limit is None or count < limit:
            length = PAGE if limit is None else min(PAGE, limit - count)
            page = self.dlq.get(index=start, length=length, auto_delete=False)
            for entry in page:
                if last is not None and entry.index > last:
                    return
                yield entry
                count += 1
            if len(page) < length:
                return
            start = page[-1].index + 1

    def pick(self, indexes: list[int]) -> list[Entry]:
        """The entries at ``indexes`` (each once, in the order given).

        Raises: CLIError naming every index the dead-letter queue does not hold.
        """
        found, missing = [], []
        for index in dict.fromkeys(indexes):
            got = self.dlq.get(index=index, length=1, auto_delete=False)
            if got and got[0].index == index:
                found.append(got[0])
            else:
                missing.append(index)
        if missing:
            raise CLIError(f"not in the dead-letter queue {self.name}: {' '.join(map(str, missing))}")
        return found

    def last(self) -> tuple[int, int]:
        """``(length, last index)`` of the dead-letter queue now."""
        attrs = self.dlq.attributes()
        try:
            return int(attrs["stream.length"]), int(attrs["stream.lastEntry"])
        except (KeyError, ValueError):
            raise CLIError(f"malformed attributes of {self.name}: no stream.length / stream.lastEntry") from None


# ------------------------------------------------------------------------------------ commands

def _list(session: _Session, args: argparse.Namespace, out: Out) -> int:
    entries = list(session.read(args.index, args.length + 1))
    more = entries[args.length].index if len(entries) > args.length else None
    letters = [Letter.of(entry) for entry in entries[: args.length]]
    if not letters:
        out.line("[INFO] no dead letters" + (f" from index {args.index}" if args.index else ""))
    elif not out.json:
        for line in _table(letters):
            out.line(line)
    for letter in letters:
        out.obj(**letter.as_json())
    if more is not None:
        out.line(f"[INFO] more from index {more}: qserve stream dlq list --index {more}")
        out.obj(more_from=more)
    return 0


def _show(session: _Session, args: argparse.Namespace, out: Out) -> int:
    for ordinal, entry in enumerate(session.pick(args.indexes)):
        out.entry(ordinal, entry)
    return 0


def _purge(session: _Session, args: argparse.Namespace, out: Out) -> int:
    if not args.all:
        entries = session.pick(args.indexes)
        indexes = [entry.index for entry in entries]
        if not confirm(args, out, f"Purging from {session.name} index(es):\n{' '.join(map(str, indexes))}"):
            return 0
        session.dlq.delete(indexes)
        out.line(f"[OK] purged {len(indexes)} entr{'y' if len(indexes) == 1 else 'ies'}: {' '.join(map(str, indexes))}")
        out.obj(purged=indexes)
        return 0
    length, last = session.last()
    if not length:
        out.line("[INFO] no dead letters")
        out.obj(purged=[])
        return 0
    if not confirm(args, out, f"Purging all {length} entries of {session.name} (every index up to {last})"):
        return 0
    session.dlq.truncate(last + 1)      # what arrives after the question has a higher index: kept
    out.line(f"[OK] purged every entry up to index {last}")
    out.obj(purged_up_to=last)
    return 0


class _Replay:
    """Replays letters one request each (the server moves them) and counts what became of them."""

    def __init__(self, session: _Session, out: Out) -> None:
        self.session = session
        self.out = out
        self.replayed = 0
        self.failed = 0

    def one(self, entry: Entry) -> None:
        """Replay one entry of the dead-letter queue.

        Raises: _EntryError (this entry fails, the replay goes on); CLIError (the replay stops:
        the server cannot be reached or refuses replays).
        """
        from qserve.client import ConnectError, QueueError
        try:
            [done] = self.session.dlq.replay(entry.index)
        except QueueError as exc:
            if exc.status in _ENTRY_ERRORS:
                raise _EntryError(exc.reason) from None
            letter = Letter.of(entry)
            fate = (f"it may have been replayed: look for requestId {letter.request_id} in {letter.queue} before "
                    "replaying it again" if isinstance(exc, ConnectError) else "nothing replayed, it stays here")
            raise CLIError(f"dlq {entry.index}: replay: {describe_queue_error(exc)} ({fate})") from None
        self.replayed += 1
        self.out.line(f"[OK] {done['index']} -> {done['queue']} {done['replayed_index']} "
                      f"requestId={done['request_id']}")
        self.out.obj(index=done["index"], queue=done["queue"], replayed_index=done["replayed_index"],
                     request_id=done["request_id"], priority=done["priority"])

    def run(self, entries) -> None:
        for entry in entries:
            try:
                self.one(entry)
            except _EntryError as exc:
                self.failed += 1
                warn(f"[ERROR] dlq {entry.index}: {exc}")
                self.out.obj(index=entry.index, error=str(exc))


class _EntryError(Exception):
    """One entry cannot be replayed; the others go on."""


def _replay(session: _Session, args: argparse.Namespace, out: Out) -> int:
    if args.all:
        length, last = session.last()
        if not length:
            out.line("[INFO] no dead letters")
            return 0
        entries = session.read(0, last=last)
        prompt = f"Replaying all {length} entries of {session.name} (up to index {last}) into their queues"
    else:
        entries = session.pick(args.indexes)
        prompt = f"Replaying from {session.name} into their queues, index(es):\n" + " ".join(
            str(e.index) for e in entries)
    if not confirm(args, out, prompt):
        return 0
    replay = _Replay(session, out)
    try:
        replay.run(entries)
    finally:
        out.line(f"[INFO] replayed: {replay.replayed}, failed: {replay.failed}")
        out.obj(replayed=replay.replayed, failed=replay.failed)
    return 1 if replay.failed else 0


_DLQ_COMMANDS = {"list": _list, "show": _show, "replay": _replay, "purge": _purge}


def cmd_dlq(args: argparse.Namespace, out: Out) -> int:
    """Run ``dlq list|show|replay|purge`` on the configured service's dead-letter queue."""
    with ExitStack() as stack:
        session = _Session(args, stack)
        return _DLQ_COMMANDS[args.dlq_command](session, args, out)
