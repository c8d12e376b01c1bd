"""Settings of `qserve stream`: the saved file, the command-line overrides, and the client they build.

Strategy: one JSON file (`config_path`) holds url, token, group and user; it is written whole
(temp file with mode 0600, since it holds the token, then rename). Every command merges, in order,
the defaults, the file and its own ``--url/--token/--group/--user`` flags, so a flag always wins
for that one command and never changes the file; only ``config`` writes it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from qserve.stream.out import CLIError, Out
from qserve.wire.names import DEFAULT_GROUP

if TYPE_CHECKING:   # the client (trio and all) is imported when a command runs, not when `qserve` starts
    from qserve.client import BlockingQueueClient

__all__ = ["DEFAULT_USER", "config_path", "load_config", "settings", "client", "cmd_config",
           "mask_token"]

DEFAULT_USER = "default_user"
_KEYS = ("url", "token", "group", "user")


def config_path() -> Path:
    """``$QSERVE_CONFIG_DIR/stream.json``, else ``$XDG_CONFIG_HOME/qserve/stream.json``, else ``~/.config/...``."""
    if os.environ.get("QSERVE_CONFIG_DIR"):
        return Path(os.environ["QSERVE_CONFIG_DIR"]) / "stream.json"
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "qserve" / "stream.json"


def load_config() -> dict:
    """The saved settings, ``{}`` when there is no file.

    Raises: CLIError if the file cannot be read or is not a JSON object.
    """
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


def settings(args: argparse.Namespace) -> dict:
    """Defaults, then the file, then this command's flags.

    Raises: CLIError when no URL results.
    """
    merged = {"group": DEFAULT_GROUP, "user": DEFAULT_USER, **load_config()}
    for key in _KEYS:
        if getattr(args, key, None) is not None:
            merged[key] = getattr(args, key)
    if not merged.get("url"):
        raise CLIError('no queue URL: run "qserve stream config --url URL" or pass --url')
    return merged


def client(args: argparse.Namespace, *, sink: bool = False) -> BlockingQueueClient:
    """A blocking client of the configured queue (its sink with ``sink``); the caller closes it."""
    from qserve.client import BlockingQueueClient
    s = settings(args)
    q = BlockingQueueClient(s["url"], token=s.get("token"), group=s["group"], user=s["user"],
                            timeout=args.request_timeout)
    if sink:
        try:
            return q.sink()
        except ValueError:
            q.close()
            raise
    return q


def mask_token(token: str | None) -> str | None:
    """``se****`` for a token of 8 characters or more, ``****`` for a shorter one (too little to hide)."""
    if not token:
        return None
    return token[:2] + "****" if len(token) >= 8 else "****"


def cmd_config(args: argparse.Namespace, out: Out) -> int:
    """Save the given flags over the file's settings; with none, show the settings in force."""
    if all(getattr(args, key) is None for key in _KEYS):
        return _show_config(args, out)
    from qserve.client.http import QueueURL
    current = load_config()
    for key in _KEYS:
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


def _show_config(args: argparse.Namespace, out: Out) -> int:
    """Print what a command would use now: the file's settings over the defaults, the token masked."""
    path = config_path()
    saved = load_config()
    merged = {"group": DEFAULT_GROUP, "user": DEFAULT_USER, **saved}
    where = str(path) if path.exists() else f"{path} (not written yet)"
    out.line(f"[OK] config: {where}")
    shown = {"url": merged.get("url") or None, "token": mask_token(merged.get("token")),
             "group": merged["group"], "user": merged["user"]}
    for key, value in shown.items():
        note = " (default)" if key in ("group", "user") and key not in saved else ""
        out.line(f"{key} : {'(not set)' if value is None else value}{note}")
    out.line(f"request_timeout : {args.request_timeout:g}s (--request-timeout, not saved)")
    out.obj(config=str(path), exists=path.exists(), **shown, request_timeout=args.request_timeout)
    return 0
