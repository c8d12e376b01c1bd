"""Output of `qserve stream`: eascmd's human lines or JSON lines, prompts, and the one-line error text.

Strategy: every command writes through one `Out`, which prints either eascmd's format (``[OK] ...``,
``[INFO] ...`` on stdout) or, with ``--json``, one JSON object per line, so a command states both
forms side by side and never branches on the mode itself. Diagnostics (``[WARN]``, ``[ERROR]``,
progress) go to stderr in both modes, which keeps stdout parseable. `format_tags` prints
tags as eascmd, a Go program, does (durations: `qserve.wire.durations`).
"""

from __future__ import annotations

import base64
import http
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qserve.client import Entry, QueueError

__all__ = ["CLIError", "Out", "confirm", "format_tags", "human_size", "describe_queue_error", "warn"]


class CLIError(Exception):
    """A failure to report as one ``[ERROR]`` line (exit status 1)."""


def format_tags(tags: dict[str, str]) -> str:
    """Go's ``types.Tags.String()``: ``tags[k=v k=v]`` sorted by key."""
    return "tags[" + " ".join(f"{k}={tags[k]}" for k in sorted(tags)) + "]"


def human_size(n: int) -> str:
    """``3.00 B``, ``1.50 KB``, ``2.00 MB`` (powers of 1024)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def describe_queue_error(exc: QueueError) -> str:
    """``401 unauthorized: missing or wrong token``; a transport failure's own reason."""
    if not exc.status:
        return str(exc)
    try:
        phrase = http.HTTPStatus(exc.status).phrase.lower()
    except ValueError:
        phrase = "error"
    return f"{exc.status} {phrase}: {exc.reason}"


def warn(text: str) -> None:
    """One diagnostic line on stderr (both modes)."""
    print(text, file=sys.stderr, flush=True)


def _entry_json(ordinal: int, entry: Entry) -> dict:
    out: dict = {"ordinal": ordinal, "index": entry.index, "tags": entry.tags}
    try:
        out["data"] = entry.data.decode("utf-8")
    except UnicodeDecodeError:
        out["data_base64"] = base64.b64encode(entry.data).decode("ascii")
    return out


class Out:
    """Human lines or JSON lines on stdout; prompts and answers. Used from one thread."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def line(self, text: str) -> None:
        """A human line (dropped in JSON mode)."""
        if not self.json:
            print(text, flush=True)

    def obj(self, **fields) -> None:
        """A JSON line (dropped in human mode)."""
        if self.json:
            print(json.dumps(fields, ensure_ascii=False), flush=True)

    def entry(self, ordinal: int, entry: Entry) -> None:
        """``[OK] [ordinal - index] tags[...] data``, or its JSON object."""
        if self.json:
            print(json.dumps(_entry_json(ordinal, entry), ensure_ascii=False), flush=True)
        else:
            data = entry.data.decode("utf-8", "backslashreplace")
            print(f"[OK] [{ordinal} - {entry.index}] {format_tags(entry.tags)} {data}", flush=True)

    def ask(self, prompt: str) -> str | None:
        """Show ``prompt``, read one line of stdin; None at end of input."""
        stream = sys.stderr if self.json else sys.stdout
        stream.write(prompt)
        stream.flush()
        answer = sys.stdin.readline()
        if not answer:
            stream.write("\n")
            return None
        return answer.strip()


def confirm(args, out: Out, prompt: str) -> bool:
    """``prompt [y/N]`` unless ``args.yes``; anything but y/yes (end of input included) prints
    ``[INFO] cancelled`` and returns False: the user declined, nothing failed."""
    if args.yes:
        return True
    answer = out.ask(prompt + " [y/N]")
    if answer is not None and answer.lower() in ("y", "yes"):
        return True
    out.line("[INFO] cancelled")
    out.obj(cancelled=True)
    return False
