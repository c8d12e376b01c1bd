"""`qserve stream dlq list|show|replay|purge`: the configured service's dead-letter queue.

Strategy: the dead-letter queue ``.../SERVICE/dlq`` (`qserve.core.policy`, ``max_deliveries``) is
an ordinary queue, so these commands use the HTTP API only (get without deleting, put, delete,
truncate, count, attributes) and work against any backend that keeps dead letters. A dead letter
is recognised by its tags (`core.policy.DLQ_TAGS`): ``dlq.queue`` (``S`` or ``S/sink``) and
``dlq.index`` name where it came from, ``dlq.requestId`` its requestId.

Replay puts each entry back into its queue with its data, its own tags (without the bookkeeping:
``dlq.*``, ``lastCode``, ``lastReason``, ``ts@*``; ``_path_`` goes back as the put's sub-path),
its requestId and its priority, and deletes it from the dead-letter queue only after that put
answered 200. Three things follow from the HTTP API:

- A crash (or a lost answer) between the put and the delete leaves the entry in both queues; a
  second replay stores it a second time, unless the queue has a dedup window
  (``--dedup-window``), which answers that put with the first replay's index and stores nothing.
- A dedup window that still holds the requestId from the entry's *first* put answers the replay
  with that first index (the entry's own ``dlq.index``): nothing was stored, so the entry stays in
  the dead-letter queue and the replay of that entry fails, until the window has passed. (The
  answer's index tells it: a put that stores gets a new index, above every earlier one.)
- The API does not return an entry's priority; a count per priority tells it (one request when the
  whole dead-letter queue has priority 0, else one or two per entry: 0 or 1). Any other priority
  cannot be told, and such an entry is replayed only with ``--priority``.
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

__all__ = ["cmd_dlq", "dlq_urls", "replay_tags", "Letter"]

PAGE = 500                   # entries per get when reading through the queue (the server allows 1000)
_DROPPED = ("lastCode", "lastReason")
_ENTRY_ERRORS = (400, 413)   # a replay put refused for its entry: that entry fails, the others go on


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


def replay_tags(tags: dict[str, str]) -> tuple[dict[str, str], str | None]:
    """The tags a replayed entry is put with, and its sub-path (``_path_``) if it had one: its own
    tags and requestId, without the dead-letter bookkeeping (``dlq.*``, ``lastCode``,
    ``lastReason``) and the put's timestamp (``ts@*``, which the server stamps again)."""
    kept = {k: v for k, v in tags.items()
            if not (k.startswith(("dlq.", "ts@")) or k in _DROPPED or k == "_path_")}
    request_id = tags.get("dlq.requestId") or tags.get("requestId")
    if request_id:
        kept["requestId"] = request_id
    return kept, tags.get("_path_") or None


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
    """Replays letters one by one (put, then delete) and counts what became of them."""

    def __init__(self, session: _Session, out: Out, priority: int | None) -> None:
        self.session = session
        self.out = out
        self.priority = priority
        self.targets: dict[str, BlockingQueueClient] = {}
        self.all_zero: bool | None = None
        self.replayed = 0
        self.failed = 0

    def target(self, queue: str) -> BlockingQueueClient:
        """The client of ``queue`` (``S`` or ``S/sink``, a ``dlq.queue`` tag) of this service."""
        service, _, kind = queue.partition("/")
        base = self.session.base
        mine = base.path[len(names.MOUNT):] if base.path.startswith(names.MOUNT) else None
        if kind not in ("", "sink") or (mine is not None and service != mine):
            raise _EntryError(f"its queue {queue!r} (dlq.queue) is not the input or sink of this service")
        if queue not in self.targets:
            self.targets[queue] = self.session.client(base.sink() if kind else base)
        return self.targets[queue]

    def priority_of(self, letter: Letter) -> int:
        """The letter's priority: ``--priority``, else told by counting (see the module docstring)."""
        if self.priority is not None:
            return self.priority
        dlq = self.session.dlq
        if self.all_zero is None:
            self.all_zero = dlq.count(priority=0) == dlq.count()
        if self.all_zero:
            return 0
        where = {"dlq.queue": letter.queue or "", "dlq.index": str(letter.queue_index)}
        for priority in (0, 1):
            if dlq.count(priority=priority, tags=where) >= 1:
                return priority
        raise _EntryError("its priority is above 1 and the HTTP API cannot tell which: replay it with --priority N")

    def one(self, letter: Letter) -> None:
        """Replay one letter.

        Raises: _EntryError (this entry fails, the replay goes on); CLIError or QueueError (the
        replay stops: the server cannot be reached or refuses puts, or the delete failed).
        """
        from qserve.client import ConnectError, QueueError
        if letter.queue is None or letter.queue_index is None:
            raise _EntryError("not a dead letter (no dlq.queue / dlq.index tags): purge it or get it instead")
        target = self.target(letter.queue)
        priority = self.priority_of(letter)
        tags, path = replay_tags(letter.entry.tags)
        try:
            index, request_id = target.put(letter.entry.data, tags, priority=priority, path=path)
        except QueueError as exc:
            if exc.status in _ENTRY_ERRORS:
                raise _EntryError(f"put into {letter.queue} refused: {describe_queue_error(exc)}") from None
            fate = ("it may be stored: look for its requestId in the queue before replaying it again"
                    if isinstance(exc, ConnectError) else "nothing stored, it stays here")
            raise CLIError(f"dlq {letter.index}: put into {letter.queue}: {describe_queue_error(exc)} ({fate})") from None
        if index == letter.queue_index:
            raise _EntryError(
                f"{letter.queue} answered its first put's index {index}: its dedup window still holds requestId "
                f"{request_id}, so nothing was stored; it stays here: replay it once the window "
                "(the queue's policy.dedupWindow attribute) has passed")
        try:
            self.session.dlq.delete(letter.index)
        except QueueError as exc:
            raise CLIError(f"dlq {letter.index}: put into {letter.queue} as {index}, but not deleted from "
                           f"{self.session.name} ({describe_queue_error(exc)}): it is in both now; "
                           f"purge it: qserve stream dlq purge {letter.index}") from None
        self.replayed += 1
        self.out.line(f"[OK] {letter.index} -> {letter.queue} {index} requestId={request_id}")
        self.out.obj(index=letter.index, queue=letter.queue, replayed_index=index, request_id=request_id,
                     priority=priority)

    def run(self, entries) -> None:
        for entry in entries:
            letter = Letter.of(entry)
            try:
                self.one(letter)
            except KeyboardInterrupt:
                warn(f"[WARN] interrupted at dlq {letter.index}: it may be in {letter.queue} too; "
                     f"look for requestId {letter.request_id} there before replaying it again")
                raise
            except _EntryError as exc:
                self.failed += 1
                warn(f"[ERROR] dlq {letter.index}: {exc}")
                self.out.obj(index=letter.index, error=str(exc))


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
    replay = _Replay(session, out, args.priority)
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
