"""Length-delimited framing of ``DataFrameProto`` messages (PROTOCOL.md 4.4, the HTTP streaming watch).

Strategy: each message (protobuf.py encodes it) goes on the stream as a 4-byte big-endian length,
then its bytes. `length_delimited` writes one; `LengthDelimitedReader` is sans-I/O, shaped like h11:
feed it bytes with ``receive_data`` and pull frames with ``next_frame``. A reader belongs to one
stream (not task-safe); nothing here keeps module-level mutable state.
"""

from __future__ import annotations

import struct

from qserve.wire.protobuf import DecodeError

__all__ = ["length_delimited", "LengthDelimitedReader", "DEFAULT_MAX_FRAME_SIZE"]

_LENGTH_PREFIX = struct.Struct(">I")

DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024   # the largest frame a reader (or the client's WebSocket) accepts

def length_delimited(frame: bytes) -> bytes:
    """Prefix one encoded ``DataFrameProto`` with its 4-byte big-endian length.

    Raises:
        ValueError: the frame is 2**32 bytes or longer.
    """
    if len(frame) > 0xFFFFFFFF:
        raise ValueError(f"frame of {len(frame)} bytes does not fit a 4-byte length")
    return _LENGTH_PREFIX.pack(len(frame)) + frame


class LengthDelimitedReader:
    """Split a byte stream into length-delimited frames, without doing any I/O.

    Feed bytes with `receive_data` (``b""`` signals end of stream, as in h11) and call
    `next_frame` until it returns ``None``. Not task-safe: one reader per stream.

    Args:
        max_frame_size: the largest frame accepted. A larger announced length raises as soon as
            its 4-byte prefix arrives, so the buffer never holds more than one frame plus what
            the caller fed beyond it.
    """

    def __init__(self, *, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 0:
            raise ValueError("max_frame_size must be >= 0")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._eof = False

    @property
    def at_eof(self) -> bool:
        """True once the end of stream was received and every complete frame was returned."""
        return self._eof and self._pos == len(self._buf)

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not yet returned as a frame (a partial frame, or unread ones)."""
        return bytes(self._buf[self._pos:])

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the stream; ``b""`` means the stream ended.

        Raises:
            RuntimeError: data after the end of stream.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise RuntimeError("received data after end of stream")
        if self._pos and self._pos * 2 >= len(self._buf):  # compact once half is consumed
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_frame(self) -> bytes | None:
        """Return the next complete frame's bytes, or ``None`` if more data is needed.

        After end of stream ``None`` means a clean end (see `at_eof`).

        Raises:
            DecodeError: a frame longer than ``max_frame_size`` was announced, or the stream
                ended inside a frame. The reader stays in that state.
        """
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available >= 4:
            (n,) = _LENGTH_PREFIX.unpack_from(buf, pos)
            if n > self.max_frame_size:
                raise DecodeError(f"frame of {n} bytes exceeds max_frame_size {self.max_frame_size}")
            if available >= 4 + n:
                self._pos = pos + 4 + n
                return bytes(buf[pos + 4:self._pos])
        if self._eof and available:
            raise DecodeError(f"stream ended inside a frame ({available} bytes left)")
        return None
