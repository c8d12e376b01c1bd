"""Encode and decode one framed record; read whole files as records plus a named outcome.

Strategy: a frame is ``u32 length | u32 crc32(body) | msgpack body`` (big endian header, see
FORMAT.md). Decoding never guesses: every way a read can end is reported as a ``ReadOutcome`` of kind
``clean``, ``torn`` (nothing valid follows the bad frame) or ``corrupt`` (a valid frame follows it). The
strict reader stops at corruption; the lenient one reports it, resynchronises on the next valid frame and
goes on. This module is the single definition of the format: ``tools/`` and recovery reuse it.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from dataclasses import dataclass, make_dataclass
from typing import Iterator, Union

import msgpack

__all__ = [
    "FRAME", "HEADER_SIZE", "MAX_RECORD", "ENTRY", "DELETE", "TRUNCATE", "STATE", "CHECKPOINT",
    "EntryRecord", "DeleteRecord", "TruncateRecord", "StateRecord", "CheckpointRecord", "Record",
    "ReadOutcome", "encode_entry", "encode_delete", "encode_truncate", "encode_state",
    "encode_checkpoint", "frame", "decode_body", "decode_entry", "decode_frame", "decode_entry_run",
    "iter_records", "find_next_frame", "REQUEST_ID",
]

FRAME = struct.Struct(">II")
HEADER_SIZE = FRAME.size
MAX_RECORD = 256 * 1024 * 1024
REQUEST_ID = "requestId"

ENTRY, DELETE, TRUNCATE, STATE, CHECKPOINT = 0, 1, 2, 3, 4

# Fixed-width prefix of every ENTRY body: fixarray(8), type 0, uint64 index, int64 priority,
# uint64 timestamp, bool moved. Legal msgpack, readable with one unpack_from.
ENTRY_PREFIX = struct.Struct(">BBBQBqBQB")
ENTRY_PREFIX_SIZE = ENTRY_PREFIX.size  # 30
# Frame header + ENTRY prefix + the requestId's str8 marker and length: one unpack (decode_entry_run).
FRAMED_ENTRY_HEAD = struct.Struct(">IIHBQBqBQBBB")
FRAMED_ENTRY_HEAD_SIZE = FRAMED_ENTRY_HEAD.size  # 40


@dataclass(frozen=True, slots=True)
class EntryRecord:
    index: int
    priority: int
    timestamp_ms: int
    moved: bool
    tags: dict
    data: bytes


def _value_record(name: str, field: str, kind: type, doc: str) -> type:
    """A record class whose body is ``[type code, value]`` (DELETE, TRUNCATE, STATE): a frozen
    dataclass with the one field ``field``."""
    return make_dataclass(name, [(field, kind)], frozen=True, slots=True,
                          namespace={"__module__": __name__, "__doc__": doc})


DeleteRecord = _value_record("DeleteRecord", "indexes", tuple, "DELETE: these indexes (sorted) are deleted.")
TruncateRecord = _value_record("TruncateRecord", "below", int, "TRUNCATE: every index below ``below`` is deleted.")
StateRecord = _value_record("StateRecord", "values", dict, "STATE: these queue-state key/values are set.")


@dataclass(frozen=True, slots=True)
class CheckpointRecord:
    base: int
    prev: int
    next_index: int
    truncate_below: int
    state: dict
    segments: tuple
    why: str = ""
    seals: tuple = ()     # ((base, size, crc32 of the whole file), ...) of sealed segments


Record = Union[EntryRecord, DeleteRecord, TruncateRecord, StateRecord, CheckpointRecord]


@dataclass(frozen=True, slots=True)
class ReadOutcome:
    """How (part of) a read ended. ``kind`` is ``clean``, ``torn`` or ``corrupt``.

    ``offset`` is where the bad frame starts (``clean``: end of file); ``resume`` is the offset of the
    next valid frame for ``corrupt`` (where the lenient reader continues), else end of file.
    ``zero_filled``: a ``torn`` end where every byte from ``offset`` on is zero - in the active
    segment, the preallocated space after its last record (FORMAT.md), not damage.
    """

    kind: str
    path: str
    offset: int
    reason: str = ""
    resume: int = 0
    zero_filled: bool = False

    @property
    def skipped(self) -> int:
        return max(0, self.resume - self.offset)


_packer = msgpack.Packer(use_bin_type=True)
_packb = _packer.pack


def frame(body: bytes) -> bytes:
    """Wrap a body in its length/crc header."""
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def encode_entry(index: int, priority: int, timestamp_ms: int, tags, data: bytes,
                 moved: bool = False) -> bytes:
    """Return the framed ENTRY record (``tags`` may include ``requestId``)."""
    rest = dict(tags)
    rid = rest.pop(REQUEST_ID, None)
    # packing [rid, rest, data] and dropping the fixarray byte = pack(rid) + pack(rest) + pack(data)
    body = ENTRY_PREFIX.pack(0x98, ENTRY, 0xCF, index, 0xD3, priority, 0xCF, timestamp_ms,
                             0xC3 if moved else 0xC2) + _packb([rid, rest, data])[1:]
    return FRAME.pack(len(body), zlib.crc32(body)) + body


def encode_delete(indexes) -> bytes:
    return frame(_packer.pack([DELETE, list(indexes)]))


def encode_truncate(below: int) -> bytes:
    return frame(_packer.pack([TRUNCATE, below]))


def encode_state(values: dict) -> bytes:
    return frame(_packer.pack([STATE, dict(values)]))


def encode_checkpoint(cp: CheckpointRecord) -> bytes:
    return frame(_packer.pack([CHECKPOINT, {
        "v": 1, "base": cp.base, "prev": cp.prev, "next": cp.next_index, "trunc": cp.truncate_below,
        "state": dict(cp.state), "segs": list(cp.segments), "why": cp.why,
        "seals": [list(x) for x in cp.seals],
    }]))


def _str_dict(d) -> dict:
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise ValueError("expected a map of str to str")
    return d


def _unpack(body) -> list:
    try:
        obj = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ValueError(f"undecodable msgpack: {exc}") from None
    if type(obj) is not list or not obj or type(obj[0]) is not int:
        raise ValueError("record is not a typed array")
    return obj


def _entry_fields(obj: list) -> tuple[int, int, int, bool, dict, bytes]:
    """(index, priority, timestamp_ms, moved, tags, data) of an unpacked ENTRY record; the tags
    include the requestId. Raises ``ValueError`` if a field is malformed."""
    _, index, prio, ts, moved, rid, tags, data = obj
    if type(tags) is not dict:
        raise ValueError("expected a map of str to str")
    for k, v in tags.items():   # a fresh dict from unpackb: ours to change
        if type(k) is not str or type(v) is not str:
            raise ValueError("expected a map of str to str")
    if rid is not None:
        if type(rid) is not str:
            raise ValueError("bad requestId")
        tags[REQUEST_ID] = rid
    if not (type(index) is int and type(prio) is int and type(ts) is int and type(data) is bytes
            and index >= 1):
        raise ValueError("bad entry fields")
    return index, prio, ts, bool(moved), tags, data


def decode_entry(body) -> tuple[int, int, int, bool, dict, bytes]:
    """Decode the body of an ENTRY record straight to its fields (the read path's `decode_body`,
    without a record object). Raises ``ValueError`` if it is not a well-formed ENTRY record."""
    obj = _unpack(body)
    if obj[0] != ENTRY or len(obj) != 8:
        raise ValueError("not an entry record")
    return _entry_fields(obj)


def decode_body(body) -> Record:
    """Decode one msgpack body. Raises ``ValueError`` if it is not a well-formed record."""
    obj = _unpack(body)
    t = obj[0]
    try:
        if t == ENTRY and len(obj) == 8:
            return EntryRecord(*_entry_fields(obj))
        if t == DELETE and len(obj) == 2 and isinstance(obj[1], list) \
                and all(isinstance(i, int) for i in obj[1]):
            return DeleteRecord(tuple(obj[1]))
        if t == TRUNCATE and len(obj) == 2 and isinstance(obj[1], int):
            return TruncateRecord(obj[1])
        if t == STATE and len(obj) == 2:
            return StateRecord(dict(_str_dict(obj[1])))
        if t == CHECKPOINT and len(obj) == 2 and isinstance(obj[1], dict):
            m = obj[1]
            return CheckpointRecord(int(m["base"]), int(m["prev"]), int(m["next"]), int(m["trunc"]),
                                    dict(_str_dict(m["state"])), tuple(int(b) for b in m["segs"]),
                                    str(m.get("why", "")),
                                    tuple((int(a), int(b), int(c)) for a, b, c in m.get("seals", ())))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad record fields: {exc!r}") from None
    raise ValueError(f"unknown record type {t!r}")


def decode_frame(buf, offset: int) -> tuple[Record, int] | str:
    """Decode the frame at ``offset``. Returns ``(record, next_offset)`` or a reason string."""
    n = len(buf)
    if offset + HEADER_SIZE > n:
        return "incomplete frame header"
    length, crc = FRAME.unpack_from(buf, offset)
    if length == 0:
        return "zero length"
    if length > MAX_RECORD:
        return f"length {length} too large"
    end = offset + HEADER_SIZE + length
    if end > n:
        return f"length {length} runs past end of file"
    body = memoryview(buf)[offset + HEADER_SIZE:end]
    if zlib.crc32(body) != crc:
        return "crc mismatch"
    try:
        return decode_body(body), end
    except ValueError as exc:
        return str(exc)


def decode_entry_run(buf, off: int, after: int, floor: int, verify: bool, loc_bias: int, cols) -> int:
    """Decode the run of plain ENTRY frames starting at ``off`` of ``buf`` without msgpack: each
    frame's header, ENTRY prefix and requestId header come from one ``FRAMED_ENTRY_HEAD.unpack_from``
    (the fixed-width layout of `encode_entry`), which is what makes reopening a large log fast.

    A plain ENTRY is one that is not ``moved``, whose requestId is nil or a str8 (a uuid, say) and whose
    index exceeds ``after`` and the previous one of the run and is at least ``floor``. Anything else
    (another record type, a moved or out-of-order entry, a bad or incomplete frame, a crc mismatch
    when ``verify``) ends the run: the caller decodes that frame the general way (`decode_frame`).

    Args:
        buf: the whole segment file.
        loc_bias: added to each record's offset to make its ``loc`` (see `index.pack_loc`).
        cols: receives one row per record: ``idx``, ``loc``, ``size`` (framed), ``prio`` and ``rh``
            (the requestId's `rids.rid_hash`, 0 if none) are appended to (``index.EntryIndex``'s
            columns; priority levels and counters are the caller's).

    Returns:
        The offset where the run ends (the first frame not decoded here, or ``len(buf)``).
    """
    n = len(buf)
    fast_end = n - FRAMED_ENTRY_HEAD_SIZE
    mv = memoryview(buf)
    unpack_head = FRAMED_ENTRY_HEAD.unpack_from
    crc32 = zlib.crc32
    a_idx, a_loc, a_size, a_prio, a_rh = cols.idx.append, cols.loc.append, cols.size.append, \
        cols.prio.append, cols.rh.append
    while off <= fast_end:
        length, crc, head, _, index, _, prio, _, _, moved, rm, rl = unpack_head(buf, off)
        end = off + HEADER_SIZE + length
        if head != 0x9800 or moved != 0xC2 or end > n or length <= 32 or index <= after or index < floor:
            break
        if verify and crc32(mv[off + HEADER_SIZE:end]) != crc:
            break
        if rm == 0xD9:     # str8: its utf-8 bytes hash as rids.rid_hash hashes the str
            a_rh(hash(buf[off + FRAMED_ENTRY_HEAD_SIZE:off + FRAMED_ENTRY_HEAD_SIZE + rl]) or 1)
        elif rm == 0xC0:   # nil: no requestId
            a_rh(0)
        else:
            break
        a_idx(index)
        a_loc(loc_bias + off)
        a_size(end - off)
        a_prio(prio)
        after = index
        off = end
    return off


_FIXARRAY = re.compile(rb"[\x91-\x9f]")


def find_next_frame(buf, start: int) -> int | None:
    """Offset of the first valid frame at or after ``start`` (resynchronisation), or None."""
    for m in _FIXARRAY.finditer(buf, start + HEADER_SIZE):
        pos = m.start() - HEADER_SIZE
        length, crc = FRAME.unpack_from(buf, pos)
        if length == 0 or pos + HEADER_SIZE + length > len(buf):
            continue
        if not isinstance(decode_frame(buf, pos), str):
            return pos
    return None


def classify_bad_frame(buf, offset: int, reason: str, path: str) -> ReadOutcome:
    """A bad frame at ``offset``: corrupt if a valid frame follows, torn otherwise."""
    n = len(buf)
    if bytes(buf[offset:]) == bytes(n - offset):  # memcmp: preallocated space is all zeros
        return ReadOutcome("torn", path, offset, f"{reason} (zero-filled tail)", n, True)
    nxt = find_next_frame(buf, offset + 1)
    if nxt is None:
        return ReadOutcome("torn", path, offset, reason, n)
    return ReadOutcome("corrupt", path, offset, reason, nxt)


def iter_records(source, lenient: bool = False, *, path: str | None = None
                 ) -> Iterator[tuple[int, Union[Record, ReadOutcome]]]:
    """Read every record of a segment file.

    Args:
        source: a path (str / PathLike) or a bytes-like object holding a whole file.
        lenient: keep going past corruption (report it and resynchronise) instead of stopping.
        path: name to use in outcomes when ``source`` is bytes.

    Yields:
        ``(offset, record)`` for each valid record, ``(offset, ReadOutcome("corrupt", ...))`` for each
        corrupt stretch, and last ``(offset, ReadOutcome)`` of kind ``clean`` or ``torn`` (or
        ``corrupt`` in strict mode, which stops there).
    """
    if isinstance(source, (str, os.PathLike)):
        name = path or os.fspath(source)
        with open(source, "rb") as f:
            buf = f.read()
    else:
        name = path or "<bytes>"
        buf = source
    n = len(buf)
    offset = 0
    while offset < n:
        res = decode_frame(buf, offset)
        if isinstance(res, str):
            outcome = classify_bad_frame(buf, offset, res, name)
            yield offset, outcome
            if outcome.kind == "torn" or not lenient:
                return
            offset = outcome.resume
            continue
        record, end = res
        yield offset, record
        offset = end
    yield n, ReadOutcome("clean", name, n, "", n)
