"""Hand-rolled proto3 codec for the three queue-service messages, plus length-delimited framing.

Strategy: the wire format is tiny and fixed (PROTOCOL.md 4.1), so there is no descriptor machinery
and no runtime dependency on ``protobuf``. Encoding writes fields in number order, omits zero and
empty fields (an all-default message is zero bytes) and writes one map entry per tag, in the
mapping's iteration order, always with both key and value. That is byte for byte what the
pure-Python ``protobuf`` runtime shipped with the SDK emits from ``SerializeToString()`` (its
``deterministic=True`` mode sorts map keys instead; both decode to the same message). Tag bytes
are module constants and small varints come from a precomputed table, so the hot path
(``encode_frame``, once per delivered entry) is a handful of appends and one ``join``.

Decoding follows the proto3 rules the reference decoders apply: fields in any order, last value
wins for scalars, map entries merge with the last key winning, a missing entry key or value means
``""``, unknown fields of every wire type (groups included) are skipped, and a known field number
arriving with an unexpected wire type is treated as unknown. Truncated input, over-long varints,
field number 0, wire types 6 and 7, mismatched group tags, stray end-group tags and invalid UTF-8 in string fields raise
`DecodeError`.

The length-delimited framing of a stream of these messages (the HTTP streaming watch) is
framing.py's.

Nothing here keeps module-level mutable state; every object is safe to share between tasks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

__all__ = [
    "DecodeError", "Frame",
    "encode_frame", "encode_frame_list", "encode_attributes",
    "decode_frame", "decode_frame_list", "decode_attributes",
]

_U64 = (1 << 64) - 1
_MAX_GROUP_DEPTH = 64

# Wire types.
_VARINT, _I64, _LEN, _SGROUP, _EGROUP, _I32 = 0, 1, 2, 3, 4, 5

# Tag bytes: (field_number << 3) | wire_type, each a single byte for our field numbers.
_T_INDEX = b"\x08"          # DataFrameProto.index          = 1, varint
_T_TAGS = b"\x12"           # DataFrameProto.tags           = 2, length-delimited (map entry)
_T_DATA = b"\x1a"           # DataFrameProto.data           = 3, length-delimited
_T_MESSAGE = b"\x22"        # DataFrameProto.message        = 4, length-delimited
_T_LIST = b"\x0a"           # DataFrameListProto.index      = 1, length-delimited
_T_ATTRS = b"\x0a"          # AttributesProto.attributes    = 1, length-delimited (map entry)
_T_KEY = b"\x0a"            # map entry key                 = 1, length-delimited
_T_VALUE = b"\x12"          # map entry value               = 2, length-delimited

_SMALL_VARINT = tuple(bytes((i,)) for i in range(0x80))


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded ``DataFrameProto``: a queue entry as it travels on the wire.

    ``tags`` is a plain dict (the dataclass is frozen, the dict is not: do not mutate a shared one).
    """

    index: int = 0
    tags: dict[str, str] = field(default_factory=dict)
    data: bytes = b""
    message: str = ""

    def __post_init__(self) -> None:
        if type(self.index) is not int or not 0 <= self.index <= _U64:
            raise ValueError(f"index must be an int in [0, 2**64-1], got {self.index!r}")
        if not isinstance(self.tags, dict):
            raise TypeError(f"tags must be a dict, got {type(self.tags).__name__}")
        if not isinstance(self.data, bytes):
            raise TypeError(f"data must be bytes, got {type(self.data).__name__}")
        if not isinstance(self.message, str):
            raise TypeError(f"message must be str, got {type(self.message).__name__}")

    def encode(self) -> bytes:
        """Return the ``DataFrameProto`` bytes of this frame (see `encode_frame`)."""
        return encode_frame(self.index, self.tags, self.data, self.message)


# --------------------------------------------------------------------------------------- encoding

def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL_VARINT[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _append_map(parts: list, tag: bytes, mapping: Mapping[str, str]) -> None:
    encode = str.encode  # TypeError for non-str keys/values, UnicodeEncodeError for lone surrogates
    for key, value in mapping.items():
        kb = encode(key, "utf-8")
        vb = encode(value, "utf-8")
        kl, vl = len(kb), len(vb)
        if kl < 0x80 and vl < 0x80:
            n = kl + vl + 4
            parts += (tag, _varint(n), _T_KEY, _SMALL_VARINT[kl], kb, _T_VALUE, _SMALL_VARINT[vl], vb)
        else:
            klen, vlen = _varint(kl), _varint(vl)
            n = 2 + len(klen) + kl + len(vlen) + vl
            parts += (tag, _varint(n), _T_KEY, klen, kb, _T_VALUE, vlen, vb)


def encode_frame(index: int, tags: Mapping[str, str], data: bytes, message: str = "") -> bytes:
    """Encode one ``DataFrameProto``.

    Args:
        index: the entry index, 0 to 2**64-1 (0 is omitted from the wire).
        tags: string to string; one map entry per item, in iteration order.
        data: the payload (any bytes-like object).
        message: optional text, omitted when empty.

    Returns:
        The message bytes; ``b""`` for an all-default frame.

    Raises:
        ValueError: index out of range, or a string that is not encodable as UTF-8.
        TypeError: a tag key or value that is not a str, or data that is not bytes-like.
    """
    parts: list[bytes] = []
    if index:
        if not 0 < index <= _U64:
            raise ValueError(f"index must be in [0, 2**64-1], got {index!r}")
        parts += (_T_INDEX, _varint(index))
    elif index != 0:
        raise ValueError(f"index must be in [0, 2**64-1], got {index!r}")
    if tags:
        _append_map(parts, _T_TAGS, tags)
    if type(data) is not bytes:
        data = memoryview(data).tobytes()
    if data:
        parts += (_T_DATA, _varint(len(data)), data)
    if message:
        mb = str.encode(message, "utf-8")
        parts += (_T_MESSAGE, _varint(len(mb)), mb)
    return b"".join(parts)


def encode_frame_list(frames: Iterable[bytes]) -> bytes:
    """Encode a ``DataFrameListProto`` from already-encoded ``DataFrameProto`` bytes.

    An empty frame (``b""``, an all-default entry) is still written, as an empty element.
    """
    parts: list[bytes] = []
    for frame in frames:
        parts += (_T_LIST, _varint(len(frame)), frame)
    return b"".join(parts)


def encode_attributes(attrs: Mapping[str, str]) -> bytes:
    """Encode an ``AttributesProto`` (one map entry per item, in iteration order).

    Raises:
        TypeError: a key or value that is not a str (callers must stringify numbers).
    """
    parts: list[bytes] = []
    _append_map(parts, _T_ATTRS, attrs)
    return b"".join(parts)


# --------------------------------------------------------------------------------------- decoding

def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & _U64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _read_tag(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    tag, pos = _read_varint(buf, pos, end)
    number, wire = tag >> 3, tag & 7
    if number == 0:
        raise DecodeError("field number 0 is illegal")
    return number, wire, pos


def _skip(buf: bytes, pos: int, end: int, number: int, wire: int) -> int:
    """Skip the value of a field whose tag was just read; return the position after it."""
    if wire == _VARINT:
        return _read_varint(buf, pos, end)[1]
    if wire == _I64:
        pos += 8
    elif wire == _I32:
        pos += 4
    elif wire == _LEN:
        n, pos = _read_varint(buf, pos, end)
        pos += n
    elif wire == _SGROUP:
        stack = [number]
        while stack:
            if len(stack) > _MAX_GROUP_DEPTH:
                raise DecodeError("groups nested too deeply")
            if pos >= end:
                raise DecodeError("truncated group")
            inner, w, pos = _read_tag(buf, pos, end)
            if w == _SGROUP:
                stack.append(inner)
            elif w == _EGROUP:
                if stack.pop() != inner:
                    raise DecodeError("mismatched end-group tag")
            else:
                pos = _skip(buf, pos, end, inner, w)
        return pos
    elif wire == _EGROUP:
        raise DecodeError("unexpected end-group tag")
    else:
        raise DecodeError(f"invalid wire type {wire}")
    if pos > end:
        raise DecodeError("truncated field")
    return pos


def _fields(buf: bytes, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(number, wire, value_start, value_end_or_varint)`` for each field in buf[pos:end].

    For length-delimited fields the last item is the end of the value; for varints it is the
    decoded value itself; for every other wire type the field has already been skipped.
    """
    while pos < end:
        number, wire, pos = _read_tag(buf, pos, end)
        if wire == _LEN:
            n, pos = _read_varint(buf, pos, end)
            stop = pos + n
            if stop > end:
                raise DecodeError("truncated length-delimited field")
            yield number, wire, pos, stop
            pos = stop
        elif wire == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield number, wire, pos, value
        else:
            pos = _skip(buf, pos, end, number, wire)


def _utf8(buf: bytes, start: int, stop: int, what: str) -> str:
    try:
        return buf[start:stop].decode("utf-8")
    except UnicodeDecodeError:
        raise DecodeError(f"invalid UTF-8 in {what}") from None


def _map_entry(buf: bytes, pos: int, end: int) -> tuple[str, str]:
    key = value = ""
    for number, wire, start, stop in _fields(buf, pos, end):
        if wire == _LEN:
            if number == 1:
                key = _utf8(buf, start, stop, "map key")
            elif number == 2:
                value = _utf8(buf, start, stop, "map value")
    return key, value


def _decode_frame(buf: bytes, pos: int, end: int) -> Frame:
    index = 0
    tags: dict[str, str] = {}
    data = b""
    message = ""
    for number, wire, start, stop in _fields(buf, pos, end):
        if wire == _LEN:
            if number == 2:
                key, value = _map_entry(buf, start, stop)
                tags[key] = value
            elif number == 3:
                data = buf[start:stop]
            elif number == 4:
                message = _utf8(buf, start, stop, "message")
        elif number == 1:  # varint: `stop` holds the value
            index = stop
    return Frame(index, tags, data, message)


def _as_bytes(buf: bytes) -> bytes:
    return buf if type(buf) is bytes else memoryview(buf).tobytes()


def decode_frame(buf: bytes) -> Frame:
    """Decode one ``DataFrameProto``.

    Raises:
        DecodeError: the bytes are truncated or malformed.
    """
    buf = _as_bytes(buf)
    return _decode_frame(buf, 0, len(buf))


def decode_frame_list(buf: bytes) -> list[Frame]:
    """Decode a ``DataFrameListProto`` into its frames, in wire order.

    Raises:
        DecodeError: the bytes are truncated or malformed.
    """
    buf = _as_bytes(buf)
    return [_decode_frame(buf, start, stop)
            for number, wire, start, stop in _fields(buf, 0, len(buf))
            if number == 1 and wire == _LEN]


def decode_attributes(buf: bytes) -> dict[str, str]:
    """Decode an ``AttributesProto`` into a dict.

    Raises:
        DecodeError: the bytes are truncated or malformed.
    """
    buf = _as_bytes(buf)
    attrs: dict[str, str] = {}
    for number, wire, start, stop in _fields(buf, 0, len(buf)):
        if number == 1 and wire == _LEN:
            key, value = _map_entry(buf, start, stop)
            attrs[key] = value
    return attrs
