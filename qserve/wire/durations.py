"""Go durations (`time.Duration`), the one parser and the one formatter of qserve.

The wire's duration parameters (``_timeout_``) use Go's ``time.ParseDuration`` syntax (``300ms``,
``1m30s``, ``1.5h``, ``2us``, ``10µs``, ``10μs``, ``-1s``, ``0``) plus bare numbers meaning seconds
(``5``, ``2.5``), with the empty string as 0; arithmetic is exact in integer nanoseconds, as in Go.
Consumer idle times in queue attributes and `qserve stream`'s timings print as Go's
``time.Duration.String()`` does, because the official clients and eascmd (Go programs) do.
"""

from __future__ import annotations

import re

__all__ = ["DurationError", "parse_go_duration", "format_go_duration", "format_seconds"]

# Go time.ParseDuration units, in nanoseconds.
_UNITS = {
    "ns": 1,
    "us": 1_000, "\u00b5s": 1_000, "\u03bcs": 1_000,  # "us", micro sign, Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_UNIT = r"(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_DURATION_RE = re.compile(rf"([+-]?)((?:{_NUMBER}{_UNIT})+|{_NUMBER})")
_COMPONENT_RE = re.compile(rf"({_NUMBER})({_UNIT})?")
_MAX_DURATION_NS = (1 << 63) - 1  # Go's time.Duration is int64 nanoseconds
_MAX_DIGITS = 30                  # beyond this a component overflows anyway; bounds int() work


class DurationError(ValueError):
    """Not a duration Go would accept; ``expected`` says what would be (for a one-line reason)."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def parse_go_duration(text: str) -> int:
    """Integer nanoseconds of ``text`` (see the module docstring for the syntax; ``""`` is 0).

    Raises:
        DurationError: not the syntax, or beyond Go's range (about 292 years either way).
    """
    if text == "":
        return 0
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise DurationError("a duration such as 5s, 1m30s, 500ms or 2.5")
    sign, body = match.groups()
    total = 0
    for number, unit in _COMPONENT_RE.findall(body):
        total += _component_ns(number, _UNITS[unit] if unit else _UNITS["s"])
    if total > _MAX_DURATION_NS:
        raise DurationError("a duration within about 292 years")
    return -total if sign == "-" else total


def _component_ns(number: str, unit_ns: int) -> int:
    """Exact nanoseconds of one ``number`` in a unit, fraction truncated (as Go does)."""
    whole, _, frac = number.partition(".")
    whole = whole.lstrip("0")
    if len(whole) > _MAX_DIGITS:
        return _MAX_DURATION_NS + 1
    frac = frac[:_MAX_DIGITS]
    ns = int(whole or "0") * unit_ns
    if frac:
        ns += int(frac) * unit_ns // 10 ** len(frac)
    return ns


def format_go_duration(ns: int) -> str:
    """Format integer nanoseconds like Go's ``time.Duration.String()``: ``0s``, ``750ms``,
    ``19.997s``, ``1m30s``, ``1h0m0s``, ``1.5µs``, ``42ns``."""
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_decimal(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_decimal(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    seconds = _decimal(rest, 1_000_000_000) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{seconds}"
    if minutes:
        return f"{sign}{minutes}m{seconds}"
    return sign + seconds


def _decimal(value: int, unit: int) -> str:
    whole, part = divmod(value, unit)
    if not part:
        return str(whole)
    return f"{whole}.{part:0{len(str(unit)) - 1}d}".rstrip("0")


def format_seconds(seconds: float) -> str:
    """`format_go_duration` of ``seconds`` rounded to the nanosecond: ``401.892141ms``, ``2m3.5s``."""
    return format_go_duration(round(seconds * 1e9))
