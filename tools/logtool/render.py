"""Text and JSON renderings of log records, damage and per-segment statistics for `qserve log`.

Strategy: one function maps a record to its fields (``record_fields``); the JSON form dumps those
fields, the text form prints them as ``key=value`` on one line after ``file@offset``. Entry data is
base64 in JSON and a short escaped preview in text. Output is deterministic (tags sorted, timestamps in
UTC), which is what the golden-file tests rely on.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone

from qserve.storage import ReadOutcome
from qserve.storage.record import (CheckpointRecord, DeleteRecord, EntryRecord, StateRecord,
                            TruncateRecord)

from .scan import Item, type_name

__all__ = ["record_fields", "format_text", "format_json", "preview", "ranges", "stats_table"]

PREVIEW_BYTES = 40


def _compact(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def preview(data: bytes, limit: int = PREVIEW_BYTES) -> str:
    """``data[N]="..."``: printable ASCII as is, the rest escaped, cut after ``limit`` bytes."""
    out = []
    for b in data[:limit]:
        if b == 0x22 or b == 0x5C:
            out.append("\\" + chr(b))
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(b) or f"\\x{b:02x}")
    more = "..." if len(data) > limit else ""
    return f'data[{len(data)}]="{"".join(out)}"{more}'


def ranges(indexes) -> str:
    """``1-3,7``: sorted indexes with consecutive runs collapsed."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(indexes):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _iso(ms: int) -> str:
    try:
        t = datetime.fromtimestamp(ms / 1000, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return f"{ms}ms"
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def record_fields(item: Item) -> dict:
    """The JSON-ready fields of an item (``data`` base64)."""
    r = item.obj
    d: dict = {"file": item.seg.path, "offset": item.offset, "size": item.size, "type": type_name(r)}
    if isinstance(r, EntryRecord):
        d.update(index=r.index, priority=r.priority, timestamp_ms=r.timestamp_ms, moved=r.moved,
                 tags=dict(sorted(r.tags.items())), data=base64.b64encode(r.data).decode("ascii"))
    elif isinstance(r, DeleteRecord):
        d["indexes"] = list(r.indexes)
    elif isinstance(r, TruncateRecord):
        d["below"] = r.below
    elif isinstance(r, StateRecord):
        d["values"] = dict(sorted(r.values.items()))
    elif isinstance(r, CheckpointRecord):
        d.update(base=r.base, prev=r.prev, next=r.next_index, trunc=r.truncate_below,
                 state=dict(sorted(r.state.items())), segs=list(r.segments), why=r.why,
                 seals=[list(s) for s in r.seals])
    elif isinstance(r, ReadOutcome):
        d.update(kind=r.kind, reason=r.reason, resume=r.resume)
    return d


def format_json(item: Item) -> str:
    return json.dumps(record_fields(item), ensure_ascii=False)


def format_text(item: Item) -> str:
    r = item.obj
    head = f"{item.seg.path}@{item.offset}"
    if isinstance(r, EntryRecord):
        return (f"{head} entry index={r.index} prio={r.priority} ts={_iso(r.timestamp_ms)} "
                f"moved={'yes' if r.moved else 'no'} tags={_compact(dict(sorted(r.tags.items())))} "
                f"{preview(r.data)}")
    if isinstance(r, DeleteRecord):
        return f"{head} delete n={len(r.indexes)} indexes={ranges(r.indexes)}"
    if isinstance(r, TruncateRecord):
        return f"{head} truncate below={r.below}"
    if isinstance(r, StateRecord):
        return f"{head} state values={_compact(dict(sorted(r.values.items())))}"
    if isinstance(r, CheckpointRecord):
        return (f"{head} checkpoint base={r.base} prev={r.prev} next={r.next_index} "
                f"trunc={r.truncate_below} why={r.why or '-'} segs={_compact(list(r.segments))} "
                f"state={_compact(dict(sorted(r.state.items())))} "
                f"seals={_compact([list(s) for s in r.seals])}")
    if r.kind == "corrupt":
        return f"{head} DAMAGE corrupt: {r.reason} ({item.size} bytes skipped, resumes at {r.resume})"
    return f"{head} DAMAGE torn tail: {r.reason} ({item.size} bytes to end of file)"


STAT_COLUMNS = ("records", "entries", "live", "dead", "damage", "bytes", "live_bytes")


def stats_table(rows: list[dict], total: dict) -> list[str]:
    """Aligned text lines: a header, one row per segment (``rows[i]["segment"]`` is the file name)
    and the total row."""
    names = [r["segment"] for r in rows] + [f"total ({len(rows)} segments)"]
    table = [[r[c] for c in STAT_COLUMNS] for r in rows] + [[total[c] for c in STAT_COLUMNS]]
    w0 = max(len("segment"), *(len(n) for n in names))
    widths = [max(len(c), *(len(str(row[k])) for row in table)) for k, c in enumerate(STAT_COLUMNS)]
    lines = ["  " + "segment".ljust(w0) + "".join(f"  {c:>{w}}" for c, w in zip(STAT_COLUMNS, widths))]
    for name, row in zip(names, table):
        lines.append("  " + name.ljust(w0) + "".join(f"  {v:>{w}}" for v, w in zip(row, widths)))
    return lines
