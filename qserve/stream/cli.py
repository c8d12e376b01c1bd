"""`qserve stream ...`: the commands of Alibaba's `eascmd stream` (PROTOCOL.md section 8) against any queue.

Strategy: argparse builds the commands (this module); each command is a small function
``(args, out) -> status`` in a private module by concept: `stream.settings` (the saved settings,
``config``), `stream.queue` (info, put, get, delete, trunc), `stream.watch` (watch),
`stream.server` (ls, create: the server, not one queue), `stream.dlq` (dlq list, show, replay,
purge: the service's dead-letter queue). Queue commands run
over a `BlockingQueueClient` (the trio loop runs in a background thread, so prompts are plain
blocking reads of stdin, line by line) and print through `stream.out.Out`: eascmd's human format
on stdout or, with ``--json``, one JSON object per line. Errors end up in `main` as exactly one
``[ERROR] ...`` line on stderr and exit status 1; argparse's usage errors exit with 2.

Decisions where eascmd is undocumented:
- ``get -k``/``--sink`` reads the sink queue of the configured service (eascmd's doc: "add it to
  read from the output queue"); ``--keep`` is the flag that reads without deleting.
- A prompt answered with anything but y/Y/yes (an empty line and end of input included) prints
  ``[INFO] cancelled`` and exits 0: nothing failed, the user declined.
- ``watch`` prompts ``commit: I ? [Y/n]`` (see `stream.watch`). Ctrl-C stops it with status 0.
- With ``--json`` prompts go to stderr so that stdout stays parseable; payloads that are not
  UTF-8 appear as ``data_base64`` instead of ``data``.
"""

from __future__ import annotations

import argparse
import sys

from qserve.stream.dlq import cmd_dlq
from qserve.stream.out import CLIError, Out, describe_queue_error
from qserve.stream.queue import cmd_delete, cmd_get, cmd_info, cmd_put, cmd_trunc
from qserve.stream.server import cmd_create, cmd_ls
from qserve.stream.settings import DEFAULT_USER, cmd_config, config_path
from qserve.wire.names import DEFAULT_GROUP
from qserve.stream.watch import cmd_watch
from qserve.wire.params import ParamError, parse_duration

__all__ = ["add_arguments", "main", "config_path"]

COMMANDS = {"config": cmd_config, "info": cmd_info, "put": cmd_put, "get": cmd_get,
            "delete": cmd_delete, "trunc": cmd_trunc, "watch": cmd_watch, "ls": cmd_ls, "create": cmd_create,
            "dlq": cmd_dlq}


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


def _start_index(text: str) -> int:
    """A watch start: an index, 0 for the head, or -1 for new entries only (PROTOCOL.md, watch)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an index or -1, got {text!r}") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"expected an index >= -1, got {text!r}")
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
    sub.add_parser("config", parents=[common], help="show (no flags) or save URL, token, group and user",
                   description=f"Save the defaults in {config_path()} (or $QSERVE_CONFIG_DIR/stream.json); "
                               "with no flag, show the settings in force (the token masked).")
    sub.add_parser("ls", parents=[common], help="list the server's queues (length, consumers, status)",
                   description="List every queue of the server of the configured URL (GET /api/queues).")
    p = sub.add_parser("create", parents=[common], help="create service NAME's input and sink queues",
                       description="Create service NAME's queues on the configured server (POST "
                                   "/api/queues/NAME); creating an existing service is not an error.")
    p.add_argument("name", metavar="NAME", help="the service name")
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
    p.add_argument("--request-id", metavar="RID", help="only the entry with this requestId (e.g. a result in -k)")
    p.add_argument("--keep", action="store_true", help="do not delete what is read")
    p = sub.add_parser("delete", parents=[queue, confirm], help="delete entries by index")
    p.add_argument("indexes", type=_index, nargs="+", metavar="INDEX")
    p = sub.add_parser("trunc", parents=[queue, confirm], help="delete every entry below INDEX")
    p.add_argument("index", type=_index, metavar="INDEX")
    p = sub.add_parser("watch", parents=[queue, tags], help="subscribe; commit entries as they arrive")
    p.add_argument("--index", type=_start_index, default=0,
                   help="start index (default 0: from the head; -1: only entries put from now on)")
    p.add_argument("--window", type=_positive, default=10, help="uncommitted entries at a time (default 10)")
    p.add_argument("--auto-commit", action="store_true", help="the server commits each entry as it is sent")
    p.add_argument("--commit-all", action="store_true", help="commit each entry without asking")
    p.add_argument("--index-only", action="store_true", help="entries without their data")
    p.add_argument("-n", "--count", type=_positive, help="stop after COUNT entries")
    _add_dlq(sub, common, confirm)


def _add_dlq(sub, common: argparse.ArgumentParser, confirm: argparse.ArgumentParser) -> None:
    """``dlq list|show|replay|purge``: the dead-letter queue of the configured URL's service."""
    p = sub.add_parser("dlq", help="the service's dead-letter queue: list, show, replay, purge",
                       description="The dead-letter queue (SERVICE/dlq) of the configured URL's service, where "
                                   "`qserve serve --max-deliveries N` moves an entry delivered N times without "
                                   "a commit. Through the HTTP API only.")
    dlq = p.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    p = dlq.add_parser("list", parents=[common], help="one line per dead letter: where from, why",
                       description="List the dead letters (read, not deleted): their index, original queue and "
                                   "index, requestId, deliveries, group, lastCode and lastReason.")
    p.add_argument("-l", "--length", type=_positive, default=100, help="entries to list (default 100)")
    p.add_argument("--index", type=_index, default=0, help="first index to list (default: the head)")
    p = dlq.add_parser("show", parents=[common], help="print dead letters whole: tags and data",
                       description="Print dead letters as `get` does: index, every tag, the data.")
    p.add_argument("indexes", type=_positive, nargs="+", metavar="INDEX")
    p = dlq.add_parser("replay", parents=[common, confirm], help="put dead letters back into their queues",
                       description="Move each entry back into its queue (tag dlq.queue) with its data, tags, "
                                   "requestId and priority, under a new index, and delete it from the dead-letter "
                                   "queue: one operation of the server (POST .../dlq?_replay_=true), so a crash "
                                   "never leaves it in both queues or neither, and a queue's dedup window takes "
                                   "the replayed entry under the new index.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("indexes", type=_positive, nargs="*", default=[], metavar="INDEX")
    which.add_argument("--all", action="store_true", help="every entry of the dead-letter queue")
    p = dlq.add_parser("purge", parents=[common, confirm], help="delete dead letters",
                       description="Delete entries of the dead-letter queue (their data is gone).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("indexes", type=_positive, nargs="*", default=[], metavar="INDEX")
    which.add_argument("--all", action="store_true", help="every entry of the dead-letter queue")


# ------------------------------------------------------------------------------------ entry point

def main(args: argparse.Namespace) -> int:
    """Run one `stream` command; every failure is one ``[ERROR]`` line on stderr and status 1."""
    from qserve.client import QueueError
    out = Out(getattr(args, "json", False))
    try:
        return COMMANDS[args.stream_command](args, out)
    except QueueError as exc:
        message = describe_queue_error(exc)
    except (CLIError, ValueError) as exc:
        message = str(exc)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    print(f"[ERROR] {message.splitlines()[0] if message else 'failed'}", file=sys.stderr, flush=True)
    return 1
