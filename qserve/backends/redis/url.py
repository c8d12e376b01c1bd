"""The ``--backend`` URL of a Redis deployment, as the client connects to it.

Three forms: ``redis://`` / ``rediss://`` (one server), ``redis+cluster://host:port,...`` (a Redis
Cluster, named by any of its nodes) and ``redis+sentinel://host:port,.../PRIMARY[/db]`` (the
Sentinels watching the primary named PRIMARY). `qserve.config.check_backend_url` has checked the
URL completely when the settings were loaded (one-line errors there); `parse_redis_url` only
converts it. The password is kept for connecting and never shown: `RedisTarget.where` is what logs
and error messages name.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from qserve.config import check_backend_url

__all__ = ["RedisTarget", "parse_redis_url"]


@dataclass(frozen=True)
class RedisTarget:
    kind: str                            # "single", "cluster" or "sentinel"
    hosts: tuple[tuple[str, int], ...]   # the server, the cluster's seed nodes, or the Sentinels
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    primary: str | None = None           # sentinel: the monitored primary's name

    @property
    def host(self) -> str:
        return self.hosts[0][0]

    @property
    def port(self) -> int:
        return self.hosts[0][1]

    @property
    def where(self) -> str:
        """What messages name (no credentials): ``host:port/db``, ``cluster host:port,...`` or
        ``sentinel PRIMARY via host:port,.../db``."""
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        if self.kind == "cluster":
            return f"cluster {hosts}"
        if self.kind == "sentinel":
            return f"sentinel {self.primary} via {hosts}/{self.db}"
        return f"{hosts}/{self.db}"


def parse_redis_url(url: str) -> RedisTarget:
    """The target of ``url`` (raises `qserve.config.ConfigError` for a URL the settings refuse)."""
    check_backend_url(url)
    scheme, _, rest = url.partition("://")
    userinfo, at, location = rest.rpartition("@")
    hostports, _, path = location.partition("/")
    user, colon, password = userinfo.partition(":")
    kind = "cluster" if scheme.endswith("+cluster") else "sentinel" if scheme.endswith("+sentinel") else "single"
    default_port = 26379 if kind == "sentinel" else 6379
    hosts = []
    for hostport in hostports.split(","):
        parts = urllib.parse.urlsplit(f"//{hostport}")
        hosts.append((parts.hostname or "", parts.port or default_port))
    segments = [p for p in path.split("/") if p]
    primary = segments.pop(0) if kind == "sentinel" else None
    return RedisTarget(
        kind=kind, hosts=tuple(hosts), db=int(segments[0]) if segments else 0,
        username=urllib.parse.unquote(user) if at and user else None,
        password=urllib.parse.unquote(password) if at and colon else None,
        ssl=scheme.startswith("rediss"), primary=primary)
