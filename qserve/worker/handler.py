"""The worker's handler side: loading `MODULE:FUNCTION`, the built-in `demo` model, calling a
handler and turning what it returns (or raises) into an outcome.

Strategy: everything here is plain synchronous code except `call_handler`, the one place that runs
user code (a sync handler in a worker thread, an async one awaited in the trio task). The rest of
the worker never sees a handler's exception, only one of three frozen outcomes: `Done` (a result to
put into the sink), `Failed` (an error result to put into the sink, with `lastCode`/`lastReason`)
and `Retry` (a negative commit, so the entry is delivered again).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

__all__ = ["Retryable", "HandlerSpecError", "Handler", "load_handler", "demo", "encode_result",
           "Done", "Failed", "Retry", "Outcome", "call_handler", "one_line"]

log = logging.getLogger("qserve.worker")

_MAX_REASON = 200            # characters of lastReason (it travels in a query string)
_MAX_CODE = 32
_MAX_ERROR_BODY = 16 * 1024  # bytes of error text stored as an error result's body


class Retryable(Exception):
    """Raise from a handler to give the entry back for another attempt (a negative commit).

    The entry is delivered again (to another worker of the group first, where one has room) and
    then carries the tags ``lastCode`` (= `code`) and ``lastReason`` (= the message), so the handler
    can tell a retry from a first attempt. Nothing is put into the sink for the failed attempt.

    Args:
        reason: the message, recorded as ``lastReason``.
        code: recorded as ``lastCode``; default ``"Retry"``.
    """

    def __init__(self, reason: str = "", *, code: str = "Retry") -> None:
        super().__init__(reason)
        self.code = code


class HandlerSpecError(ValueError):
    """`--handler` names nothing callable; the message is one line."""


@dataclass(frozen=True)
class Handler:
    """A loaded handler: ``fn(data: bytes, tags: dict[str, str])``; `is_async` if it must be awaited."""

    fn: Callable[..., Any]
    name: str
    is_async: bool


def demo(data: bytes, tags: Mapping[str, str]) -> list[dict[str, float]]:
    """The built-in toy model: two class probabilities for any input, a stable function of the bytes.

    Returns e.g. ``[{"p_0": 0.52, "p_1": 0.48}]`` (the probabilities add up to 1).
    """
    h = int.from_bytes(hashlib.sha256(bytes(data)).digest()[:4], "big")
    p0 = round(0.01 + 0.98 * h / 0xFFFFFFFF, 2)
    return [{"p_0": p0, "p_1": round(1.0 - p0, 2)}]


def load_handler(spec: str) -> Handler:
    """Resolve ``MODULE:FUNCTION`` (the function may be a dotted attribute path) or ``demo``.

    Raises:
        HandlerSpecError: malformed spec, module not importable (or raising while imported, a
            SyntaxError included), attribute missing, not callable.
    """
    if spec == "demo":
        return Handler(demo, "demo", is_async=False)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise HandlerSpecError(f"handler {spec!r}: expected MODULE:FUNCTION or demo")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise HandlerSpecError(f"handler {spec!r}: cannot import {module_name}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - user code: a module that fails while it is imported
        log.debug("importing %s failed", module_name, exc_info=True)
        raise HandlerSpecError(f"handler {spec!r}: importing {module_name} failed: "
                               f"{one_line(_describe(exc))}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise HandlerSpecError(f"handler {spec!r}: {module_name} has no attribute {attr}") from None
    if not callable(obj):
        raise HandlerSpecError(f"handler {spec!r}: {type(obj).__name__} is not callable")
    is_async = inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(getattr(obj, "__call__", None))
    return Handler(obj, spec, is_async=is_async)


def encode_result(result: object) -> tuple[bytes, str | None]:
    """A handler's return value as ``(body, content_type)``.

    bytes-like -> as is (no content type); str -> UTF-8; dict or list -> JSON; None -> empty.

    Raises:
        TypeError: any other type.
    """
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result), None
    if isinstance(result, str):
        return result.encode("utf-8"), "text/plain; charset=utf-8"
    if isinstance(result, (dict, list)):
        return json.dumps(result, ensure_ascii=False).encode("utf-8"), "application/json"
    if result is None:
        return b"", None
    raise TypeError(f"handler returned {type(result).__name__}; expected bytes, str, dict, list or None")


def one_line(text: str, limit: int = _MAX_REASON) -> str:
    """The first non-blank line of `text`, stripped and cut to `limit` characters."""
    for line in text.splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


# ------------------------------------------------------------------------------------ outcomes

@dataclass(frozen=True)
class Done:
    body: bytes
    content_type: str | None = None


@dataclass(frozen=True)
class Failed:
    code: str
    reason: str
    body: bytes


@dataclass(frozen=True)
class Retry:
    code: str
    reason: str


Outcome = Done | Failed | Retry


def _code_of(exc: BaseException, default: str) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, bool) or not isinstance(code, (int, str)):
        return default
    code = one_line(str(code), _MAX_CODE)
    return code or default


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def call_handler(handler: Handler, entry_data: bytes, tags: dict[str, str], *,
                       thread_limiter: trio.CapacityLimiter) -> Outcome:
    """Run the handler on one entry and classify what happened.

    A sync handler runs in a worker thread (`thread_limiter` bounds them); when the calling task is
    cancelled the thread is abandoned (it runs on in the background, its result is dropped). Any
    `Exception` becomes `Failed` (or `Retry` for `Retryable`); cancellation propagates.
    """
    try:
        if handler.is_async:
            result = await handler.fn(entry_data, tags)
        else:
            result = await trio.to_thread.run_sync(handler.fn, entry_data, tags, abandon_on_cancel=True,
                                                   limiter=thread_limiter)
        if inspect.isawaitable(result):
            result = await result
        body, content_type = encode_result(result)
    except Retryable as exc:
        return Retry(_code_of(exc, "Retry"), one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001 - user code: any error becomes an error result
        text = _describe(exc)
        log.debug("handler %s failed on requestId %s", handler.name, tags.get("requestId"), exc_info=True)
        return Failed(_code_of(exc, "500"), one_line(text) or type(exc).__name__,
                      text.encode("utf-8", "replace")[:_MAX_ERROR_BODY])
    return Done(body, content_type)
