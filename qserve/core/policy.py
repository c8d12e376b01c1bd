"""Delivery policies of one queue: what the server does beyond the EAS contract, each off by default.

Strategy: a `Policy` is a frozen value the configuration builds per service (`Config.policy_for`:
the server's flags as defaults, a ``[services.NAME]`` table of the TOML file overriding them), and
the queue's backend enforces it. With every setting at its default a queue behaves exactly as the
EAS queue service does, so the official clients see no difference. The settings, by the names the
flags and the attributes use:

- ``max_deliveries`` (``--max-deliveries N``, 0 = off): an entry delivered N times to one group
  without a commit moves to the service's dead-letter queue (``/api/predict/S/dlq``), tagged
  `dead_letter_tags`; a replay (``POST .../S/dlq?_replay_=true``) moves it back as `replay_letter` says.
- ``retry_backoff`` (``--retry-backoff INITIAL,FACTOR,MAX``): a negative commit without ``_delay_``
  hides the entry from its group for ``min(MAX, INITIAL * FACTOR ** (n - 1))`` after its n-th
  delivery (`Policy.backoff`).
- ``dedup_window`` (``--dedup-window DURATION``, 0 = off): a put whose client-supplied requestId was
  stored in the queue within the window answers the original index and stores nothing.
- ``delivery_timeout`` (``--delivery-timeout DURATION``, 0 = off): an entry a consumer holds that
  long without a commit goes back to its group as if negatively committed (``lastCode=timeout``).

Durations are Go durations (``1m30s``) or seconds (``90``), as the query parameters take them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from qserve.core.errors import BadRequest
from qserve.core.events import QueueRef
from qserve.wire.params import ParamError, parse_duration

__all__ = ["Policy", "PolicyError", "POLICY_KEYS", "parse_backoff", "DLQ_TAGS", "TIMEOUT_CODE", "dead_letter_tags",
           "Letter", "replay_letter"]

#: the tags a dead-lettered entry carries besides its own (its origin and why it ended there)
DLQ_TAGS = ("dlq.queue", "dlq.index", "dlq.requestId", "dlq.group", "dlq.deliveries", "lastCode", "lastReason")
TIMEOUT_CODE = "timeout"          # lastCode of an entry whose consumer's lease (delivery_timeout) ran out
MAX_BACKOFF = 24 * 3600.0         # the longest delay a negative commit or a backoff may ask: one day


class PolicyError(ValueError):
    """A policy setting is invalid; the message is one line naming it."""


@dataclass(frozen=True)
class Policy:
    """The delivery policies of one queue (every field off by default). Immutable."""

    max_deliveries: int = 0                              # 0: never dead-letter
    retry_backoff: tuple[float, float, float] | None = None   # (initial s, factor, max s)
    dedup_window: float = 0.0                            # seconds; 0: no deduplication
    delivery_timeout: float = 0.0                        # seconds; 0: a consumer holds an entry until it goes

    def __post_init__(self) -> None:
        if self.max_deliveries < 0:
            raise PolicyError("max_deliveries: must be >= 0 (0: off)")
        for name in ("dedup_window", "delivery_timeout"):
            if getattr(self, name) < 0:
                raise PolicyError(f"{name}: must be >= 0 (0: off)")

    @property
    def active(self) -> bool:
        """Whether any policy is on (a queue without one takes none of their costs)."""
        return self != Policy()

    def backoff(self, deliveries: int) -> float:
        """Seconds a negatively committed entry waits after its ``deliveries``-th delivery (0: none)."""
        if self.retry_backoff is None or deliveries < 1:
            return 0.0
        initial, factor, most = self.retry_backoff
        try:
            return min(most, initial * factor ** (deliveries - 1))
        except OverflowError:
            return most

    def attributes(self) -> dict[str, str]:
        """The ``policy.*`` attribute keys (shown for every queue, "0"/"" when off)."""
        backoff = self.retry_backoff
        return {
            "policy.maxDeliveries": str(self.max_deliveries),
            "policy.retryBackoff": "" if backoff is None else f"{_seconds(backoff[0])},{backoff[1]:g},{_seconds(backoff[2])}",
            "policy.dedupWindow": _seconds(self.dedup_window),
            "policy.deliveryTimeout": _seconds(self.delivery_timeout),
        }

    def merged(self, overrides: Mapping[str, Any], where: str) -> "Policy":
        """This policy with the settings of ``overrides`` (a TOML table: names as the flags', with
        ``_`` or ``-``) replaced; unknown names are an error naming ``where``."""
        changes = {}
        for key, value in overrides.items():
            name = key.replace("-", "_")
            if name not in POLICY_KEYS:
                raise PolicyError(f"{where}: unknown setting {key!r} (expected {', '.join(POLICY_KEYS)})")
            changes[name] = coerce(name, value)
        return replace(self, **changes)


POLICY_KEYS = tuple(f.name for f in fields(Policy))


def coerce(name: str, value: Any) -> Any:
    """A flag's, variable's or TOML value of policy setting ``name`` as the field's type."""
    if name == "max_deliveries":
        if isinstance(value, bool):
            raise PolicyError(f"max_deliveries: expected a count, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise PolicyError(f"max_deliveries: expected a count, got {value!r}") from None
    if name == "retry_backoff":
        return parse_backoff(value)
    return duration(name, value)


def duration(name: str, value: Any) -> float:
    """Seconds from a Go duration string or a number; one-line `PolicyError` otherwise."""
    if isinstance(value, bool):
        raise PolicyError(f"{name}: expected a duration (5m, 1m30s or seconds), got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        try:
            seconds = parse_duration(name, str(value).strip(), 0.0)
        except ParamError as exc:
            raise PolicyError(str(exc)) from None
    if not 0 <= seconds <= MAX_BACKOFF * 365:
        raise PolicyError(f"{name}: out of range: {value!r}")
    return seconds


def parse_backoff(value: Any) -> tuple[float, float, float] | None:
    """``INITIAL,FACTOR,MAX`` (durations, a number, durations) -> a tuple; "" or None -> None."""
    if value is None or value == "":
        return None
    parts = list(value) if isinstance(value, (list, tuple)) else str(value).split(",")
    if len(parts) != 3:
        raise PolicyError(f"retry_backoff: expected INITIAL,FACTOR,MAX (e.g. 1s,2,1m), got {value!r}")
    initial = duration("retry_backoff", parts[0])
    try:
        factor = float(parts[1])
    except (TypeError, ValueError):
        raise PolicyError(f"retry_backoff: the factor must be a number, got {parts[1]!r}") from None
    most = duration("retry_backoff", parts[2])
    if not 1.0 <= factor <= 100.0:
        raise PolicyError(f"retry_backoff: the factor must be from 1 to 100, got {parts[1]!r}")
    if most > MAX_BACKOFF or initial > most:
        raise PolicyError(f"retry_backoff: expected INITIAL <= MAX <= 24h, got {value!r}")
    return (initial, factor, most)


def dead_letter_tags(origin, letter, tags: Mapping[str, str]) -> dict[str, str]:
    """The tags a dead-lettered entry gains (`DLQ_TAGS`): ``origin`` is its queue (a `QueueRef`),
    ``letter`` the dispatcher's `DeadLetter`, ``tags`` its own (its requestId stays its requestId)."""
    return {
        "dlq.queue": origin.name,
        "dlq.index": str(letter.index),
        "dlq.requestId": str(tags.get("requestId", "")),
        "dlq.group": letter.group,
        "dlq.deliveries": str(letter.deliveries),
        "lastCode": letter.code,
        "lastReason": letter.reason,
    }


@dataclass(frozen=True)
class Letter:
    """A dead letter as its replay puts it back: into ``origin`` with these tags (requestId
    included) under a new index; ``index`` is its index in the dead-letter queue."""

    index: int
    origin: QueueRef
    tags: dict[str, str]

    @property
    def request_id(self) -> str:
        return self.tags["requestId"]


def replay_letter(dlq: QueueRef, index: int, tags: Mapping[str, str], now_ms: int) -> Letter:
    """How dead letter ``index`` of ``dlq`` (a service's dead-letter queue) goes back: into its
    ``dlq.queue`` (that service's input or sink) with its own tags, its requestId (``dlq.requestId``)
    and ``_path_``, without the bookkeeping (``dlq.*``, ``lastCode``, ``lastReason``) and the earlier
    put's timestamp (``ts@*``), stamped ``ts@source``/``ts@sink`` = ``now_ms`` as a put is.

    Raises: BadRequest naming the index for an entry that is not a dead letter of this service."""
    origin_name = tags.get("dlq.queue", "")
    if not origin_name or not str(tags.get("dlq.index", "")).isdigit():
        raise BadRequest(f"entry {index} of {dlq.name} is not a dead letter (no dlq.queue / dlq.index tags): "
                         "delete it or get it instead")
    service, _, kind = origin_name.partition("/")
    if service != dlq.service or kind not in ("", "sink"):
        raise BadRequest(f"entry {index} of {dlq.name}: its queue {origin_name!r} (dlq.queue) is not the input "
                         f"or sink of service {dlq.service}")
    origin = QueueRef(service, sink=kind == "sink")
    kept = {k: v for k, v in tags.items() if not (k.startswith(("dlq.", "ts@")) or k in _BOOKKEEPING)}
    request_id = tags.get("dlq.requestId") or tags.get("requestId")
    if request_id:
        kept["requestId"] = request_id
    kept["ts@sink" if origin.sink else "ts@source"] = str(now_ms)
    return Letter(index, origin, kept)


_BOOKKEEPING = ("lastCode", "lastReason")


def _seconds(value: float) -> str:
    """A duration as the attributes show it: seconds, without a trailing ``.0``."""
    return f"{value:g}s" if value else "0"
