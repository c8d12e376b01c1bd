"""What a `qserve chaos` run records: its puts, the entries it saw, the removals it made (plain
records, filled in by `history.History` and judged by `checker`), and the payload each put sends.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = ["POISON", "TIMEOUT_CODE", "payload_for", "id_of", "Attempt", "Put", "Seen", "DeadSeen", "Removal"]

POISON = ("poison", "1")       # the tag of an entry every consumer refuses (negative commits only)
TIMEOUT_CODE = "timeout"       # lastCode of an entry whose consumer's lease ran out


def payload_for(put_id: str) -> bytes:
    """The payload a put with ``put_id`` sends: the id, ``|``, then 64..1963 bytes derived from it."""
    seed = hashlib.blake2b(put_id.encode(), digest_size=16).digest()
    n = 64 + int.from_bytes(seed[:2], "big") % 1900
    return put_id.encode() + b"|" + (seed * (n // 16 + 1))[:n]


def id_of(data: bytes) -> str:
    """The put id a payload starts with (whatever precedes the first ``|``)."""
    return data.split(b"|", 1)[0].decode("utf-8", "replace")


@dataclass
class Attempt:
    """One sending of a put: the first, or a retry with the same payload and tags."""

    start: int
    ack: int | None = None
    index: int | None = None
    duplicate: bool = False    # answered with X-Qserve-Duplicate: 1


@dataclass
class Put:
    id: str
    producer: int
    tags: dict[str, str]
    priority: int
    start: int
    ack: int | None = None     # the first acknowledgment (of any attempt), and its index
    index: int | None = None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def poison(self) -> bool:
        return self.tags.get(POISON[0]) == POISON[1]


@dataclass(frozen=True)
class Seen:
    """One observation of ``index`` holding ``id``: a watch delivery or an entry left at the end."""

    index: int
    id: str
    tick: int
    conn_start: int        # tick at which the delivering connection's handshake started; -1 = final drain
    group: str
    intact: bool
    consumer: str = ""
    last_code: str = ""


@dataclass(frozen=True)
class DeadSeen:
    """An entry found in the dead-letter queue at the end: ``origin`` is its ``dlq.index``."""

    dlq_index: int
    id: str
    tick: int
    origin: int | None
    group: str
    last_code: str
    intact: bool
    wrong: str             # "" or what its dlq.* tags get wrong


@dataclass
class Removal:
    kind: str              # "commit", "delete" or "truncate"
    indexes: tuple[int, ...] = ()
    below: int = 0         # truncate: every index < below
    start: int = 0
    ack: int | None = None
    by: str = ""           # commit: the consumer and its group ("": not known)
    group: str = ""
    conn_start: int = 0    # commit: the consumer's watch connection when the commit started
    held: float = 0.0      # commit: seconds from receiving the delivery to the acknowledgment

    def covers(self, index: int) -> bool:
        return index < self.below if self.kind == "truncate" else index in self.indexes
