"""`qserve stream ...`: the commands of Alibaba's `eascmd stream` (PROTOCOL.md section 8) against any queue.

Strategy: argparse builds the commands; each command is a small function over a
`BlockingQueueClient` (the trio loop runs in a background thread, so prompts are plain blocking
reads of stdin, line by line) and an `_Out` that prints either eascmd's human format on stdout or,
with ``--json``, one JSON object per line. Errors end up in `main` as exactly one ``[ERROR] ...``
line on stderr and exit status 1; argparse's usage errors exit with 2.

Decisions where eascmd is undocumented:
- ``get -k``/``--sink`` reads the sink queue of the configured service (eascmd's doc: "add it to
  read from the output queue"); ``--keep`` is the flag that reads without deleting.
- A prompt answered with anything but y/Y/yes (an empty line and end of input included) prints
  ``[INFO] cancelled`` and exits 0: nothing failed, the user declined.
- ``watch`` prompts ``commit: I ? [Y/n]`` (empty or y commits; n asks ``negative: I ? [Y/n]``, where
  empty or y negatively commits and n leaves the entry delivered until the watch ends). End of
  input stops the watch without answering the current entry. Ctrl-C stops it with status 0.
- With ``--json`` prompts go to stderr so that stdout stays parseable; payloads that are not
  UTF-8 appear as ``data_base64`` instead of ``data``.
"""

from __future__ import annotations

import argparse
import base64
import http
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .params import ParamError, parse_duration

if TYPE_CHECKING:   # the client (trio and all) is imported when a command runs, not when `qserve` starts
    from .client import BlockingQueueClient, Entry, QueueError

__all__ = ["add_arguments", "main", "config_path", "format_tags", "go_duration"]

DEFAULT_GROUP = "default_group"
DEFAULT_USER = "default_user"
PROGRESS_EVERY = 1000
_ENTRY_ERRORS = (400, 413)  # a put -f line failing with these is counted and skipped


class CLIError(Exception):
    """A failure to report as one ``[ERROR]`` line (exit status 1)."""


# ------------------------------------------------------------------------------------ formatting

def format_tags(tags: dict[str, str]) -> str:
    """Go's ``types.Tags.String()``: ``tags[k=v k=v]`` sorted by key."""
    return "tags[" + " ".join(f"{k}={tags[k]}" for k in sorted(tags)) + "]"


def go_duration(seconds: float) -> str:
    """Go's ``time.Duration.String()``: ``401.892141ms``, ``1.5s``, ``2m3.5s``, ``0s``."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign, ns = ("-", -ns) if ns < 0 else ("", ns)
    if ns < 1_000_000_000:
        for unit, size in (("ns", 1), ("µs", 1_000), ("ms", 1_000_000)):
            if ns < size * 1000:
                return sign + _trim(ns, size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _trim(rest, 1_000_000_000) + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    if hours:
        text = f"{hours}h" + text
    return sign + text


def _trim(value: int, size: int) -> str:
    whole, frac = divmod(value, size)
    if not frac:
        return str(whole)
    digits = len(str(size)) - 1
    return f"{whole}.{frac:0{digits}d}".rstrip("0")


def human_size(n: int) -> str:
    """``3.00 B``, ``1.50 KB``, ``2.00 MB`` (powers of 1024)."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _entry_json(ordinal: int, entry: Entry) -> dict:
    out: dict = {"ordinal": ordinal, "index": entry.index, "tags": entry.tags}
    try:
        out["data"] = entry.data.decode("utf-8")
    except UnicodeDecodeError:
        out["data_base64"] = base64.b64encode(entry.data).decode("ascii")
    return out


class _Out:
    """Human lines or JSON lines on stdout; prompts and answers."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json

    def line(self, text: str) -> None:
        if not self.json:
            print(text, flush=True)

    def obj(self, **fields) -> None:
        if self.json:
            print(json.dumps(fields, ensure_ascii=False), flush=True)

    def entry(self, ordinal: int, entry: Entry) -> None:
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


# ------------------------------------------------------------------------------------ settings

def config_path() -> Path:
    """``$QSERVE_CONFIG_DIR/stream.json``, else ``$XDG_CONFIG_HOME/qserve/stream.json``, else ``~/.config/...``."""
    if os.environ.get("QSERVE_CONFIG_DIR"):
        return Path(os.environ["QSERVE_CONFIG_DIR"]) / "stream.json"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qserve" / "stream.json"


def _load_config() -> dict:
    path = config_path()
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CLIError(f"cannot read config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise CLIError(f"cannot read config {path}: not a JSON object")
    return data


def _settings(args: argparse.Namespace) -> dict:
    settings = {"group": DEFAULT_GROUP, "user": DEFAULT_USER, **_load_config()}
    for key in ("url", "token", "group", "user"):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    if not settings.get("url"):
        raise CLIError('no queue URL: run "qserve stream config --url URL" or pass --url')
    return settings


def _client(args: argparse.Namespace, *, sink: bool = False) -> BlockingQueueClient:
    from .client import BlockingQueueClient
    s = _settings(args)
    client = BlockingQueueClient(s["url"], token=s.get("token"), group=s["group"], user=s["user"],
                                 timeout=args.request_timeout)
    if sink:
        try:
            return client.sink()
        except ValueError:
            client.close()
            raise
    return client


# ------------------------------------------------------------------------------------ commands

def cmd_config(args: argparse.Namespace, out: _Out) -> int:
    from ._client_http import QueueURL
    current = _load_config()
    for key in ("url", "token", "group", "user"):
        if getattr(args, key) is not None:
            current[key] = getattr(args, key)
    if not current.get("url"):
        raise CLIError("config needs --url")
    QueueURL.parse(current["url"])
    path = config_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)   # it holds the token
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(current, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        raise CLIError(f"cannot write config {path}: {exc.strerror or exc}") from None
    out.line(f"[OK] config saved: {path}")
    out.obj(saved=str(path), url=current["url"], group=current.get("group", DEFAULT_GROUP),
            user=current.get("user", DEFAULT_USER))
    return 0


def cmd_info(args: argparse.Namespace, out: _Out) -> int:
    with _client(args, sink=args.sink) as q:
        attrs = q.attributes()
    out.line("[OK] Attributes: ")
    for key in sorted(attrs):
        out.line(f"{key} : {attrs[key]}")
    out.obj(attributes=dict(sorted(attrs.items())))
    return 0


def _lines(path: str):
    with open(path, "rb") as f:
        for raw in f:
            yield raw.rstrip(b"\n").removesuffix(b"\r")


def cmd_put(args: argparse.Namespace, out: _Out) -> int:
    from .client import QueueError
    tags = dict(args.tags)
    with _client(args, sink=args.sink) as q:
        if args.file is not None:
            out.line(f"[INFO] Opening data file: {args.file}")
            try:
                items = _lines(args.file)
                first = next(items, None)
            except OSError as exc:
                raise CLIError(f"cannot open {args.file}: {exc.strerror or exc}") from None
            items = [] if first is None else _chain(first, items)
        else:
            items = [args.data.encode("utf-8")]
        start = time.monotonic()
        total = success = size = 0
        for data in items:
            total += 1
            try:
                index, request_id = q.put(data, tags, priority=args.priority)
            except QueueError as exc:
                if exc.status not in _ENTRY_ERRORS or args.file is None:
                    raise               # not about this entry (unreachable, 401, ended, full): stop here
                print(f"[ERROR] entry {total}: {_describe_queue_error(exc)}", file=sys.stderr, flush=True)
                continue
            success += 1
            size += len(data)
            out.line(f"[OK] {index}")
            out.obj(index=index, request_id=request_id)
            if args.file is not None and total % PROGRESS_EVERY == 0:
                print(f"[INFO] {total} lines read, {success} put", file=sys.stderr, flush=True)
        elapsed = time.monotonic() - start
    failed = total - success
    out.line("[INFO] Put data done.")
    out.line(f"Total time cost: {go_duration(elapsed)}")
    out.line(f"Total size: {human_size(size)}")
    out.line(f"Total: {total}, success: {success}, failed: {failed}")
    out.obj(total=total, success=success, failed=failed, bytes=size, seconds=round(elapsed, 6))
    return 1 if failed else 0


def _chain(first, rest):
    yield first
    yield from rest


def cmd_get(args: argparse.Namespace, out: _Out) -> int:
    with _client(args, sink=args.sink) as q:
        entries = q.get(index=args.index, length=args.length, timeout=args.timeout,
                        auto_delete=not args.keep, tags=dict(args.tags) or None)
    if not entries:
        out.line("[INFO] no data")
    for ordinal, entry in enumerate(entries):
        out.entry(ordinal, entry)
    return 0


def _confirm(args: argparse.Namespace, out: _Out, prompt: str) -> bool:
    if args.yes:
        return True
    answer = out.ask(prompt + " [y/N]")
    if answer is not None and answer.lower() in ("y", "yes"):
        return True
    out.line("[INFO] cancelled")
    out.obj(cancelled=True)
    return False


def cmd_delete(args: argparse.Namespace, out: _Out) -> int:
    indexes = args.indexes
    if not _confirm(args, out, "Deleting index(es):\n" + " ".join(map(str, indexes))):
        return 0
    with _client(args, sink=args.sink) as q:
        q.delete(indexes)
    out.line("[OK] deleted")
    out.obj(deleted=indexes)
    return 0


def cmd_trunc(args: argparse.Namespace, out: _Out) -> int:
    if not _confirm(args, out, f"trunc stream from index: {args.index}"):
        return 0
    with _client(args, sink=args.sink) as q:
        q.truncate(args.index)
    out.line("[OK] truncated")
    out.obj(truncated=args.index)
    return 0


def _yes(answer: str) -> bool:
    return answer == "" or answer.lower() in ("y", "yes")


def cmd_watch(args: argparse.Namespace, out: _Out) -> int:
    try:
        with _client(args, sink=args.sink) as q:
            _watch(args, out, q)
    except KeyboardInterrupt:       # the usual way to end a watch
        print(file=sys.stderr)
    return 0


def _watch(args: argparse.Namespace, out: _Out, q: BlockingQueueClient) -> None:
    prompting = not (args.auto_commit or args.commit_all)
    q.attributes()      # fail now on a bad URL or token; the watch itself retries outages forever
    flags = (f"index: {args.index}, indexOnly: {str(args.index_only).lower()}, "
             f"autoCommit: {str(args.auto_commit).lower()}, window: {args.window}")
    out.line(f"[INFO] Start to watch: {flags}")
    out.obj(watch={"index": args.index, "indexOnly": args.index_only, "autoCommit": args.auto_commit,
                   "window": args.window})
    seen = 0
    with q.watch(index=args.index, window=args.window, index_only=args.index_only,
                 auto_commit=args.auto_commit, tags=dict(args.tags) or None) as watcher:
        for entry in watcher:
            out.entry(seen, entry)
            seen += 1
            if args.commit_all:
                q.commit(entry.index)
                out.obj(index=entry.index, action="commit")
            elif prompting and not _answer_entry(q, out, entry.index):
                break
            if args.count is not None and seen >= args.count:
                break


def _answer_entry(q: BlockingQueueClient, out: _Out, index: int) -> bool:
    """Prompt commit / negative for one entry; False at end of input."""
    answer = out.ask(f"commit: {index} ? [Y/n]")
    if answer is None:
        return False
    if _yes(answer):
        q.commit(index)
        out.obj(index=index, action="commit")
        return True
    answer = out.ask(f"negative: {index} ? [Y/n]")
    if answer is None:
        return False
    if _yes(answer):
        q.negative(index, reason="negative commit from qserve stream watch")
        out.obj(index=index, action="negative")
    else:
        out.obj(index=index, action="none")
    return True


COMMANDS = {"config": cmd_config, "info": cmd_info, "put": cmd_put, "get": cmd_get,
            "delete": cmd_delete, "trunc": cmd_trunc, "watch": cmd_watch}


# ------------------------------------------------------------------------------------ arguments

def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def _duration(text: str) -> float:
    try:
        return parse_duration("--timeout", text, 0.0)
    except ParamError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an index, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative index, got {text!r}")
    return value


def _positive(text: str) -> int:
    value = _index(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `stream` subcommands; every one but `config` takes --url/--token/--group/--user overrides."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="queue URL, e.g. http://127.0.0.1:8080/api/predict/SERVICE")
    common.add_argument("--token", help="token sent as Authorization")
    common.add_argument("--group", help=f"consumer group (default {DEFAULT_GROUP})")
    common.add_argument("--user", help=f"consumer user id (default {DEFAULT_USER})")
    common.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    common.add_argument("--request-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="timeout of one request (default 10)")
    queue = argparse.ArgumentParser(add_help=False, parents=[common])
    queue.add_argument("-k", "--sink", action="store_true", help="use the sink (output) queue of the service")
    tags = argparse.ArgumentParser(add_help=False)
    tags.add_argument("--tags", type=_tag, action="append", default=[], metavar="K=V",
                      help="a tag (repeatable)")
    confirm = argparse.ArgumentParser(add_help=False)
    confirm.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")

    sub = parser.add_subparsers(dest="stream_command", required=True, metavar="COMMAND")
    p = sub.add_parser("config", parents=[common], help="save URL, token, group and user",
                       description=f"Save the defaults in {config_path()} (or $QSERVE_CONFIG_DIR/stream.json).")
    sub.add_parser("info", parents=[queue], help="print the queue's attributes")
    p = sub.add_parser("put", parents=[queue, tags], help="put -d DATA, or -f FILE with one entry per line")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("-d", "--data", help="the payload")
    source.add_argument("-f", "--file", help="a file with one payload per line")
    p.add_argument("--priority", type=_index, default=0, help="priority (> 0 is dispatched first)")
    p = sub.add_parser("get", parents=[queue, tags], help="get (and by default delete) entries")
    p.add_argument("-l", "--length", type=_positive, default=1, help="entries to get (default 1)")
    p.add_argument("--timeout", type=_duration, default=0.0, help="wait this long for data (e.g. 3s)")
    p.add_argument("--index", type=_index, default=0, help="first index to look at (default: the head)")
    p.add_argument("--keep", action="store_true", help="do not delete what is read")
    p = sub.add_parser("delete", parents=[queue, confirm], help="delete entries by index")
    p.add_argument("indexes", type=_index, nargs="+", metavar="INDEX")
    p = sub.add_parser("trunc", parents=[queue, confirm], help="delete every entry below INDEX")
    p.add_argument("index", type=_index, metavar="INDEX")
    p = sub.add_parser("watch", parents=[queue, tags], help="subscribe; commit entries as they arrive")
    p.add_argument("--index", type=_index, default=0, help="start index (default 0: from the head)")
    p.add_argument("--window", type=_positive, default=10, help="uncommitted entries at a time (default 10)")
    p.add_argument("--auto-commit", action="store_true", help="the server commits each entry as it is sent")
    p.add_argument("--commit-all", action="store_true", help="commit each entry without asking")
    p.add_argument("--index-only", action="store_true", help="entries without their data")
    p.add_argument("-n", "--count", type=_positive, help="stop after COUNT entries")


# ------------------------------------------------------------------------------------ entry point

def _describe_queue_error(exc: QueueError) -> str:
    if not exc.status:
        return str(exc)
    try:
        phrase = http.HTTPStatus(exc.status).phrase.lower()
    except ValueError:
        phrase = "error"
    return f"{exc.status} {phrase}: {exc.reason}"


def main(args: argparse.Namespace) -> int:
    from .client import QueueError
    out = _Out(getattr(args, "json", False))
    try:
        return COMMANDS[args.stream_command](args, out)
    except QueueError as exc:
        message = _describe_queue_error(exc)
    except (CLIError, ValueError) as exc:
        message = str(exc)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    print(f"[ERROR] {message.splitlines()[0] if message else 'failed'}", file=sys.stderr, flush=True)
    return 1
