"""`qserve log dump|verify|stats|repair PATH`: inspect, check and repair queue logs on disk.

Strategy: ``qserve.cli`` calls ``add_arguments`` to build the sub-subcommands and ``main(args)`` to run
one. PATH is a data directory (every queue below it, sorted), one queue directory or, for dump and
verify, one ``.seg`` file. dump, verify and stats only read, through storage's lenient decoder
(``scan``), so a damaged log can still be inspected; repair is ``QueueLog.open`` with
``LogConfig(repair=True)``, i.e. exactly what storage itself does. Results go to stdout, progress and
errors to stderr; errors are one line (``qserve log: <reason>``), never a traceback.

Readers take no lock, so they work while a server has the queues open; repair needs each queue's
directory lock (``<queue>/LOCK``, held by whoever has the queue open) and refuses a queue another
process holds, naming that process.

Exit status: 0 success (verify: no damage), 1 damage found (verify), a repair failed or was refused,
or an unexpected error; 2 usage error (missing PATH, nothing to inspect, unreadable file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from qserve.storage import DirectoryLocked, ReadOutcome, StorageError
from qserve.storage.replay import Replay

from .render import format_json, format_text, stats_table
from .scan import (GONE_NOTE, TYPES, Progress, Queue, UsageError, find_queues, read_segment, type_name,
                   verify_queue)

__all__ = ["add_arguments", "main"]

_PATH_HELP = "a data directory (all queues below it), one queue directory or one .seg file"


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``dump``, ``verify``, ``stats`` and ``repair`` sub-commands to ``parser``."""
    sub = parser.add_subparsers(dest="log_command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str, path_help: str = _PATH_HELP) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("path", metavar="PATH", help=path_help)
        p.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                       help="progress lines on stderr: auto (queues over 64 MiB, default), always, never")
        return p

    p = command("dump", "print every record in log order, damage included (lenient decoder)")
    p.add_argument("--json", action="store_true", help="one JSON object per line (entry data in base64)")
    p.add_argument("--from", dest="from_index", type=int, metavar="N",
                   help="only entries (and deletes naming an index) >= N")
    p.add_argument("--to", dest="to_index", type=int, metavar="N",
                   help="only entries (and deletes naming an index) <= N")
    p.add_argument("--tag", dest="tags", action="append", type=_tag, default=[], metavar="KEY=VALUE",
                   help="only entries with this tag (repeatable: all must match)")
    p.add_argument("--type", dest="types", action="append", choices=TYPES,
                   help="only records of this type (repeatable). With --from/--to/--tag, records "
                        "without an index are shown only when named here. Damage is always shown.")
    p.set_defaults(_run=_dump)

    p = command("verify", "check CRCs, framing, headers, index order and the segment list; "
                "exit 1 on any damage")
    p.set_defaults(_run=_verify)

    p = command("stats", "per segment: records, entries, live and dead entries, bytes",
                "a data directory (all queues below it) or one queue directory")
    p.add_argument("--json", action="store_true", help="one JSON object per queue")
    p.set_defaults(_run=_stats)

    p = command("repair", "open each queue with repair on (torn tails cut, damaged stretches dropped, "
                ".broken copies kept) and say what was done. Stop the server first.",
                "a data directory (all queues below it) or one queue directory")
    p.add_argument("--dry-run", action="store_true", help="change nothing: run verify instead")
    p.set_defaults(_run=_repair)


def main(args: argparse.Namespace) -> int:
    """Run one ``qserve log`` command. Returns the exit status."""
    try:
        return args._run(args, sys.stdout)
    except UsageError as exc:
        return _fail(str(exc))
    except BrokenPipeError:          # `qserve log dump | head`
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except OSError as exc:
        reason = exc.strerror or str(exc)
        reason = reason[:1].lower() + reason[1:]
        return _fail(f"cannot read {exc.filename}: {reason}" if exc.filename else reason)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: one line, no traceback
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return _fail(f"{args.log_command} failed: {type(exc).__name__}" + (f": {text}" if text else ""), 1)


def _fail(reason: str, status: int = 2) -> int:
    print(f"qserve log: {reason}", file=sys.stderr)
    return status


def _progress(args, queue: Queue) -> Progress:
    return Progress(queue.path, queue.total_bytes, args.progress)


def _segments(queue: Queue, progress: Progress):
    """Every item of the queue in log order. A segment a running server removed since it was
    listed (compaction) is skipped with a note on stderr."""
    done = 0
    for seg in queue.segments:
        yield from read_segment(seg, progress, done)
        if seg.gone:
            print(f"qserve log: note: {seg.path} {GONE_NOTE}", file=sys.stderr)
        done += seg.size
    progress.finish()


# -- dump ------------------------------------------------------------------------------------------
def _selector(args):
    lo = args.from_index if args.from_index is not None else -1
    hi = args.to_index if args.to_index is not None else float("inf")
    if lo > hi:
        raise UsageError(f"--from {args.from_index} is above --to {args.to_index}")
    types = set(args.types or TYPES)
    narrowed = args.from_index is not None or args.to_index is not None or bool(args.tags)
    explicit = set(args.types or ())

    def wanted(r) -> bool:
        name = type_name(r)
        if name == "damage":
            return True
        if name not in types:
            return False
        if name == "entry":
            return lo <= r.index <= hi and all(r.tags.get(k) == v for k, v in args.tags)
        if name == "delete" and not args.tags:
            return not narrowed or any(lo <= i <= hi for i in r.indexes)
        return not narrowed or name in explicit

    return wanted


def _dump(args, out) -> int:
    wanted = _selector(args)
    fmt = format_json if args.json else format_text
    for queue in find_queues(args.path):
        for item in _segments(queue, _progress(args, queue)):
            if wanted(item.obj):
                out.write(fmt(item) + "\n")
    return 0


# -- verify ----------------------------------------------------------------------------------------
def _verify(args, out) -> int:
    status = 0
    for queue in find_queues(args.path):
        progress = _progress(args, queue)
        res = verify_queue(queue, progress)
        progress.finish()
        for p in res.problems:
            out.write(f"DAMAGE {p}\n")
        for p in res.notes:
            out.write(f"note {p}\n")
        n = len(queue.segments)
        size = f"{n} segment{'s' if n != 1 else ''}, {res.records} record{'s' if res.records != 1 else ''}"
        if res.problems:
            status = 1
            k = len(res.problems)
            out.write(f"DAMAGED {queue.path}: {k} problem{'s' if k != 1 else ''} in {size}\n")
        else:
            out.write(f"OK {queue.path}: {size}\n")
    return status


# -- stats -----------------------------------------------------------------------------------------
_STAT_KEYS = ("records", "entries", "live", "dead", "damage", "bytes", "live_bytes")


def queue_stats(queue: Queue, progress: Progress) -> dict:
    """Per-segment and total counts for one queue (live = after replaying the whole queue with the
    rules recovery applies, storage's `Replay`; a segment's id there is its position in the queue)."""
    replay = Replay()
    rows = {seg.base: dict(segment=os.path.basename(seg.path), records=0, entries=0, live=0, dead=0,
                           damage=0, bytes=0, live_bytes=0) for seg in queue.segments}
    sid_of = {seg.base: sid for sid, seg in enumerate(queue.segments)}
    for item in _segments(queue, progress):
        row = rows[item.seg.base]
        if isinstance(item.obj, ReadOutcome):
            row["damage"] += 1
            continue
        row["records"] += 1
        if type_name(item.obj) == "entry":
            row["entries"] += 1
        replay.apply(sid_of[item.seg.base], item.offset, item.size, item.obj)
    replay.finish()
    for seg in queue.segments:
        row = rows[seg.base]
        row["bytes"] = seg.size
        tally = replay.tallies.get(sid_of[seg.base])
        if tally is not None:
            row["live"], row["live_bytes"] = tally.live_count, tally.live_bytes
    for row in rows.values():
        row["dead"] = row["entries"] - row["live"]
    segs = [rows[seg.base] for seg in queue.segments if not seg.gone]
    total = {k: sum(r[k] for r in segs) for k in _STAT_KEYS}
    return {"queue": queue.path, "segments": segs, "total": total, "next_index": replay.next_index,
            "truncate_below": replay.watermark, "state": dict(sorted(replay.state.items()))}


def _stats(args, out) -> int:
    for queue in find_queues(args.path, allow_file=False):
        st = queue_stats(queue, _progress(args, queue))
        if args.json:
            out.write(json.dumps(st, ensure_ascii=False) + "\n")
            continue
        out.write(f"{st['queue']}\n")
        for line in stats_table(st["segments"], st["total"]):
            out.write(line + "\n")
        out.write(f"  next index {st['next_index']}, truncate watermark {st['truncate_below']}, "
                  f"state {json.dumps(st['state'], ensure_ascii=False)}\n")
    return 0


# -- repair ----------------------------------------------------------------------------------------
def _repair(args, out) -> int:
    if args.dry_run:
        return _verify(args, out)
    from qserve.storage import LogConfig, QueueLog

    status = 0
    for queue in find_queues(args.path, allow_file=False):
        try:
            log = QueueLog.open(queue.path, LogConfig(repair=True))
            try:
                rep, live = log.recovery, len(log)
            finally:
                log.close()
        except DirectoryLocked as exc:
            holder = f"process {exc.pid}" if exc.pid is not None else "another process"
            print(f"qserve log repair: {queue.path} is in use by {holder} (a running server?); "
                  "stop it or let it fence the queue first", file=sys.stderr)
            status = 1
            continue
        except StorageError as exc:
            print(f"qserve log: repair {queue.path}: {exc}", file=sys.stderr)
            status = 1
            continue
        done = []
        if rep.truncated_bytes:
            done.append(f"cut {rep.truncated_bytes} bytes of torn tail")
        stretches = [s for s in rep.skipped if s[0] not in rep.missing]
        if stretches:
            done.append(f"dropped {len(stretches)} damaged stretch{'es' if len(stretches) != 1 else ''}")
        if rep.missing:
            done.append(f"went on without {len(rep.missing)} missing segment(s)")
        if rep.removed:
            done.append(f"deleted {len(rep.removed)} unlisted segment(s)")
        if done:
            out.write(f"REPAIRED {queue.path}: {', '.join(done)}; {live} live entries\n")
        else:
            out.write(f"OK {queue.path}: nothing to repair, {live} live entries\n")
        for path, offset, reason in stretches:
            out.write(f"  dropped {path}@{offset}: {reason}\n")
        for path in rep.missing:
            out.write(f"  missing {path}\n")
        for path in rep.removed:
            out.write(f"  deleted {path} (not listed by the last checkpoint, no live entry)\n")
        for path in rep.broken_files:
            out.write(f"  kept {path}\n")
    return status
