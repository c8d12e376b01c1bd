"""`qserve stream watch`: subscribe to a queue and commit (or negatively commit) entries as they arrive.

Strategy: the blocking client's watcher yields entries in the main thread, which prints each one and
then, unless ``--auto-commit`` or ``--commit-all``, asks ``commit: I ? [Y/n]`` (empty or y commits;
n asks ``negative: I ? [Y/n]``, where empty or y gives the entry back and n leaves it delivered
until the watch ends). End of input stops the watch without answering the current entry; Ctrl-C
stops it with status 0 (it is the usual way to end a watch).

Outages are retried forever by the client (the watch is meant to outlive server restarts), but
not silently: the watcher's ``on_link`` hook prints ``[WARN] lost ORIGIN: REASON; reconnecting``
once when the server goes away and ``[INFO] reconnected`` once when it is back, on stderr (so
stdout stays the entries, and ``--json`` stays parseable). The hook runs on the client's loop
thread; each message is one ``print`` of a whole line, so it never interleaves within a line. A
commit that an outage stops is one ``[WARN]`` line too, not the end of the watch: the server
delivers that entry again after the reconnect, and it is asked about again.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from qserve.stream.out import Out, warn
from qserve.stream.settings import client

if TYPE_CHECKING:
    from qserve.client import BlockingQueueClient

__all__ = ["cmd_watch"]


def _yes(answer: str) -> bool:
    return answer == "" or answer.lower() in ("y", "yes")


def cmd_watch(args: argparse.Namespace, out: Out) -> int:
    try:
        with client(args, sink=args.sink) as q:
            _watch(args, out, q)
    except KeyboardInterrupt:       # the usual way to end a watch
        print(file=sys.stderr)
    return 0


def _watch(args: argparse.Namespace, out: Out, q: BlockingQueueClient) -> None:
    prompting = not (args.auto_commit or args.commit_all)
    q.attributes()      # fail now on a bad URL or token; the watch itself retries outages forever
    flags = (f"index: {args.index}, indexOnly: {str(args.index_only).lower()}, "
             f"autoCommit: {str(args.auto_commit).lower()}, window: {args.window}")
    out.line(f"[INFO] Start to watch: {flags}")
    out.obj(watch={"index": args.index, "indexOnly": args.index_only, "autoCommit": args.auto_commit,
                   "window": args.window})
    seen = 0
    origin = q.client.url.origin

    def on_link(up: bool, reason: str) -> None:
        try:        # on the client's loop thread: an exception here would end the watch, not this line
            warn("[INFO] reconnected" if up else f"[WARN] lost {origin}: {reason}; reconnecting")
        except (OSError, ValueError):       # stderr closed: nobody to tell
            pass

    with q.watch(index=args.index, window=args.window, index_only=args.index_only,
                 auto_commit=args.auto_commit, tags=dict(args.tags) or None, on_link=on_link) as watcher:
        for entry in watcher:
            out.entry(seen, entry)
            seen += 1
            if args.commit_all:
                if _acked(q.commit, entry.index):
                    out.obj(index=entry.index, action="commit")
            elif prompting and not _answer_entry(q, out, entry.index):
                break
            if args.count is not None and seen >= args.count:
                break


def _acked(call, index: int, **kwargs) -> bool:
    """Commit (or negatively commit) one entry; an outage is a warning, not the end of the watch.

    The server keeps an entry whose commit did not arrive and delivers it again once the watch
    has reconnected, so the answer is asked again then. An HTTP error still ends the watch.
    """
    from qserve.client import ConnectError
    try:
        call(index, **kwargs)
    except ConnectError as exc:
        warn(f"[WARN] answer to {index} not delivered ({exc}); it comes again after the reconnect")
        return False
    return True


def _answer_entry(q: BlockingQueueClient, out: Out, index: int) -> bool:
    """Prompt commit / negative for one entry; False at end of input."""
    answer = out.ask(f"commit: {index} ? [Y/n]")
    if answer is None:
        return False
    if _yes(answer):
        if _acked(q.commit, index):
            out.obj(index=index, action="commit")
        return True
    answer = out.ask(f"negative: {index} ? [Y/n]")
    if answer is None:
        return False
    if _yes(answer):
        if _acked(q.negative, index, reason="negative commit from qserve stream watch"):
            out.obj(index=index, action="negative")
    else:
        out.obj(index=index, action="none")
    return True
