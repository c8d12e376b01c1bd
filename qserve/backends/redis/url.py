"""The ``--backend`` URL of a Redis server, as the client connects to it.

`qserve.config.check_backend_url` has checked the URL completely when the settings were loaded
(one-line errors there); `parse_redis_url` only converts it. The password is kept for connecting
and never shown: `RedisTarget.where` (host:port/db) is what logs and error messages name.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from qserve.config import check_backend_url

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
    """The target of ``url`` (raises `qserve.config.ConfigError` for a URL the settings refuse)."""
    check_backend_url(url)
    parts = urllib.parse.urlsplit(url)
    return RedisTarget(
        host=parts.hostname or "", port=parts.port or 6379, db=int(parts.path.strip("/") or 0),
        username=urllib.parse.unquote(parts.username) if parts.username else None,
        password=urllib.parse.unquote(parts.password) if parts.password is not None else None,
        ssl=parts.scheme == "rediss")
