"""Query-parameter parsing: pure functions from decoded query strings to typed values.

Strategy: every parser takes the parameter's name, its raw (already URL-decoded) value or ``None``
when absent, and a default; it returns the typed value or raises `ParamError` with a one-line
reason that names the parameter and quotes (a bounded, escaped prefix of) the offending value.
`ParamError` is the one error of a bad or missing query parameter: `qserve.core.routing.route`
turns every one into a 400 (PROTOCOL.md "Decisions": bad requests), in one place. No I/O, no
state, nothing here knows about HTTP.

Accepted forms (PROTOCOL.md 2.2 and "Decisions for qserve"):

- booleans: ``true``/``false``/``1``/``0`` in any case; nothing else (not ``t``, ``yes``, ``""``);
- integers: ASCII decimal with an optional sign, limited to 64 bits (-2**63 .. 2**64-1) on top of
  the caller's ``minimum``/``maximum``;
- durations: Go ``time.ParseDuration`` syntax (``300ms``, ``1m30s``, ``1.5h``, ``2us``, ``10µs``,
  ``10μs``, ``-1s``, ``0``) plus bare numbers meaning seconds (``5``, ``2.5``); the empty string is
  0; negative values and values beyond Go's range (about 292 years) are rejected. Arithmetic is
  exact in integer nanoseconds, as in Go, before the final conversion to float seconds;
- index lists: comma-separated unsigned 64-bit decimals, blanks around items and empty items
  (``1,,2,``) tolerated, duplicates dropped keeping first-seen order, at least one index.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from qserve.wire.durations import DurationError, parse_go_duration

__all__ = [
    "ParamError", "parse_bool", "parse_int", "parse_duration", "parse_index_list", "required",
    "split_params", "is_control_name",
]

_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1
_SHOW_LIMIT = 40

_INT_RE = re.compile(r"[+-]?[0-9]+")
_UINT_RE = re.compile(r"[0-9]+")
_PLAIN_LIST_RE = re.compile(r"[0-9]{1,20}(?:,[0-9]{1,20})*")
_BOOLS = {"true": True, "false": False, "1": True, "0": False}

class ParamError(ValueError):
    """A query parameter is missing or has a value the server cannot accept.

    ``str(exc)`` is a one-line reason that starts with the parameter's wire name (``_index_: ...``),
    fit to send to the client; `qserve.core.routing.route` turns it into the 400.
    """

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name}: {problem}")
        self.name = name


def _wrong(name: str, expected: str, value: str | None) -> ParamError:
    got = "nothing" if value is None else _show(value)
    return ParamError(name, f"expected {expected}, got {got}")


def _show(value: str) -> str:
    """Quote a client-supplied value for an error reason: bounded, escaped, one line."""
    if len(value) > _SHOW_LIMIT:
        return repr(value[:_SHOW_LIMIT]) + "..."
    return repr(value)


def parse_bool(name: str, value: str | None, default: bool) -> bool:
    """Parse a boolean parameter.

    Args:
        name: the parameter name, for the error reason.
        value: the decoded value, or ``None`` when the parameter is absent.
        default: returned when absent.

    Returns:
        The boolean.

    Raises:
        ParamError: anything but ``true``/``false``/``1``/``0`` (any case).
    """
    if value is None:
        return default
    try:
        return _BOOLS[value.lower()]
    except KeyError:
        raise _wrong(name, "true, false, 1 or 0", value) from None


def _int_expectation(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer between {minimum} and {maximum}"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def parse_int(name: str, value: str | None, default: int, *,
              minimum: int | None = None, maximum: int | None = None) -> int:
    """Parse a decimal integer parameter.

    Args:
        name: the parameter name, for the error reason.
        value: the decoded value, or ``None`` when the parameter is absent.
        default: returned (unchecked) when absent.
        minimum, maximum: inclusive bounds, if any. The value must also fit 64 bits
            (-2**63 .. 2**64-1), whatever the bounds.

    Returns:
        The integer.

    Raises:
        ParamError: not an optionally signed run of ASCII digits, or out of range.
    """
    if value is None:
        return default
    expected = _int_expectation(minimum, maximum)
    if not _INT_RE.fullmatch(value) or len(value.lstrip("+-0")) > 20:
        raise _wrong(name, expected, value)
    n = int(value)
    if not _I64_MIN <= n <= _U64_MAX:
        raise _wrong(name, expected, value)
    if (minimum is not None and n < minimum) or (maximum is not None and n > maximum):
        raise _wrong(name, expected, value)
    return n


def parse_duration(name: str, value: str | None, default: float) -> float:
    """Parse a duration parameter into seconds.

    Args:
        name: the parameter name, for the error reason.
        value: the decoded value, or ``None`` when the parameter is absent.
        default: seconds, returned when absent.

    Returns:
        Non-negative seconds (``""`` and ``"0"`` give ``0.0``).

    Raises:
        ParamError: not Go duration syntax nor a bare number, negative, or beyond Go's range.
    """
    if value is None:
        return default
    try:
        ns = parse_go_duration(value)
    except DurationError as exc:
        raise _wrong(name, exc.expected, value) from None
    if ns < 0:
        raise _wrong(name, "a non-negative duration", value)
    return ns / 1e9


def parse_index_list(name: str, value: str | None) -> list[int]:
    """Parse a comma-separated list of entry indexes (``_indexes_=1,2,3``).

    Args:
        name: the parameter name, for the error reason.
        value: the decoded value, or ``None`` when the parameter is absent.

    Returns:
        The indexes in first-seen order, duplicates removed; never empty.

    Raises:
        ParamError: absent, no index at all, or an item that is not an unsigned 64-bit decimal.
    """
    expected = "a comma-separated list of unsigned integers"
    if value is None:
        raise _wrong(name, expected, None)
    if _PLAIN_LIST_RE.fullmatch(value):   # the usual form (no blanks, empty items or long zeros)
        indexes = list(dict.fromkeys(map(int, value.split(","))))
        if max(indexes) <= _U64_MAX:
            return indexes
        raise _wrong(name, expected, value)
    seen: dict[int, None] = {}
    for item in value.split(","):
        item = item.strip(" \t")
        if not item:
            continue
        if not _UINT_RE.fullmatch(item) or len(item.lstrip("0")) > 20 or int(item) > _U64_MAX:
            raise _wrong(name, expected, value)
        seen[int(item)] = None
    if not seen:
        raise _wrong(name, expected, value)
    return list(seen)


def required(name: str, value: str | None, when: str = "") -> str:
    """The value of a parameter the request must carry (``when``: in which case, for the reason).

    Raises:
        ParamError: absent (``_index_: required with _trunc_``).
    """
    if value is None:
        raise ParamError(name, f"required {when}".rstrip())
    return value


def is_control_name(name: str) -> bool:
    """True for a system parameter name: ``_x_``, starting and ending with ``_``, length > 2."""
    return len(name) > 2 and name[0] == "_" and name[-1] == "_"


def split_params(query: Iterable[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Split decoded query pairs into control parameters and tags.

    Args:
        query: ``(name, value)`` pairs, for example from ``urllib.parse.parse_qsl(...,
            keep_blank_values=True)``.

    Returns:
        ``(control, tags)``: names like ``_length_`` go to ``control``, every other name (including
        ``_``, ``__`` and ``_x``) to ``tags``; for a repeated name the last value wins. Unknown
        control names are kept in ``control`` for the caller to ignore; they never become tags.
    """
    control: dict[str, str] = {}
    tags: dict[str, str] = {}
    for name, value in query:
        if is_control_name(name):
            control[name] = value
        else:
            tags[name] = value
    return control, tags
