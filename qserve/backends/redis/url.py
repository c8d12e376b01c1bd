"""The ``--backend`` URL of a Redis server: ``redis://[user:password@]host:port[/db]`` or ``rediss://``.

Parsed once at start (`parse_redis_url`); the password is kept for connecting and never shown:
`RedisTarget.where` (host:port/db) is what logs and error messages name.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

__all__ = ["RedisTarget", "parse_redis_url"]


@dataclass(frozen=True)
class RedisTarget:
    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    @property
    def where(self) -> str:
        """``host:port/db`` for messages (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """The target of ``url``.

    Raises:
        ValueError: not a redis:// or rediss:// URL with a host, a port in 1-65535 and a
            non-negative db number; the one-line message names what is wrong (never the password).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError("expected redis://[user:password@]host:port[/db] or rediss://...")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("the URL names no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a non-negative number, got {path!r}")
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    return RedisTarget(
        host=parts.hostname, port=port or 6379, db=int(path or 0),
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
        ssl=parts.scheme == "rediss")
