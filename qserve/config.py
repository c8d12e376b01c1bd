"""Server configuration: one frozen `Config`, built from defaults < TOML file < environment < flags.

Strategy: nothing below the CLI reads the environment or files; `load_config()` does it once and
passes the result down explicitly (no module-level state). Every setting has a flag `--x-y`, an
environment variable `QSERVE_X_Y` and a TOML key `x_y` (plus `[tokens]` and `queues` tables in the
file), and a ``[services.NAME]`` table of the file overrides the delivery policies
(`core.policy`) for one service.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from qserve.core import policy as _policy
from qserve.core.policy import Policy, PolicyError

__all__ = ["Config", "ConfigError", "load_config", "FSYNC_POLICIES", "BACKEND_SCHEMES", "is_loopback",
           "check_backend_url", "redact_url"]

FSYNC_POLICIES = ("always", "interval", "never")
FSYNC_BACKENDS = ("auto", "aio", "threads")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A setting is invalid; the message is one line naming it."""


@dataclass(frozen=True)
class Config:
    """Everything the server needs to run. Task-safe (immutable)."""

    host: str = "127.0.0.1"
    port: int = 8080
    processes: int = 1                             # server processes sharing the port (Redis backend only)
    data_dir: Path = Path("qserve-data")
    token: str | None = None                       # one token for every queue
    tokens: Mapping[str, str] = field(default_factory=dict)   # per service, overrides `token`
    insecure: bool = False                         # allow a non-loopback listener without a token
    fsync: str = "always"                          # always (group commit) | interval | never
    fsync_interval: float = 0.2                    # seconds, for fsync=interval
    fsync_backend: str = "auto"                    # auto (kernel AIO where it works, else threads) | aio | threads
    fsync_poll: bool = True                        # an fsync the idle loop waits for: polled for (AIO), not slept on
    idle_poll_us: int = 1000                       # the idle loop polls for arrivals up to this long (adaptive; 0: never)
    max_payload_bytes: int = 524288
    max_length: int = 1_000_000                    # stream.approxMaxLength; a put beyond it gets 429
    trim_oldest: bool = False                      # instead of 429, drop the oldest entries (Redis MAXLEN)
    segment_bytes: int = 64 * 1024 * 1024
    queues: tuple[str, ...] = ()                   # declared services; empty = created on first use
    max_queues: int = 1024                         # open queues (input and sink count apart); more -> 507
    root_service: str | None = None                # also serve this service at / and /sink
    auto_create: bool = True                       # False: a request to an unknown queue gets 404
    max_connections: int = 2048
    max_header_bytes: int = 16 * 1024
    keepalive_timeout: float = 60.0
    request_timeout: float = 30.0
    shutdown_timeout: float = 10.0                 # on SIGTERM/Ctrl-C, seconds requests get to finish
    max_get_length: int = 1000                     # upper bound of _length_
    max_watch_window: int = 1000                   # upper bound of _window_
    worker: str | None = None                      # MODULE:FUNCTION run inside the server
    worker_concurrency: int = 1                    # entries the embedded worker handles at once
    log_level: str = "INFO"
    log_format: str = "text"                       # text | json (one JSON object a line)
    access_log: bool = False                       # one log line per request (qserve.access)
    metrics_token: str | None = None               # GET /metrics also takes this token (scrapers)
    backend: str = ""                              # "" = the local segment log in data_dir; redis://... = Redis
    redis_wait: int = 0                            # Redis: answer a write once this many replicas have it (WAIT)
    redis_wait_timeout: float = 1.0                # seconds WAIT may take before the write is answered 503
    node_lease: float = 10.0                       # Redis: seconds a dead node's consumers keep their entries
    # delivery policies (`core.policy`), every queue's unless its service's [services.NAME] table says otherwise
    max_deliveries: int = 0                        # dead-letter an entry after this many deliveries (0: off)
    retry_backoff: tuple[float, float, float] | None = None   # a negative commit's delay: initial, factor, max
    dedup_window: float = 0.0                      # seconds a client's requestId deduplicates puts (0: off)
    delivery_timeout: float = 0.0                  # seconds a consumer may hold an entry (0: no limit)
    services: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)   # per-service policy overrides

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise ConfigError(f"fsync: expected one of {', '.join(FSYNC_POLICIES)}, got {self.fsync!r}")
        if self.fsync_backend not in FSYNC_BACKENDS:
            raise ConfigError(f"fsync_backend: expected one of {', '.join(FSYNC_BACKENDS)}, "
                              f"got {self.fsync_backend!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log_format: expected one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: out of range: {self.port}")
        for name in ("max_payload_bytes", "max_length", "segment_bytes", "max_connections",
                     "max_header_bytes", "max_get_length", "max_watch_window", "worker_concurrency",
                     "max_queues", "processes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1")
        if self.backend:
            check_backend_url(self.backend)
        if self.processes > 1 and not self.backend:
            raise ConfigError(f"processes: {self.processes} server processes need --backend redis://...: "
                              "a segment log has one owner (the local backend runs in one process)")
        if self.processes > 1 and self.worker:
            raise ConfigError("processes: --worker runs inside one server process; with --processes run "
                              "`qserve worker` beside the servers")
        if self.redis_wait < 0:
            raise ConfigError("redis_wait: must be >= 0")
        if not 0 <= self.idle_poll_us <= 100_000:
            raise ConfigError("idle_poll_us: must be between 0 and 100000")
        for name in ("fsync_interval", "keepalive_timeout", "request_timeout", "shutdown_timeout",
                     "redis_wait_timeout", "node_lease"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0")
        for svc in (*self.queues, *self.tokens, *([self.root_service] if self.root_service else [])):
            if not svc or "/" in svc or svc in (".", ".."):
                raise ConfigError(f"service name {svc!r}: must be non-empty and contain no '/'")
        try:
            default = self.default_policy()
            for svc, table in self.services.items():
                if not isinstance(table, Mapping):
                    raise PolicyError(f"services.{svc}: expected a table of settings")
                default.merged(table, f"services.{svc}")
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
        if not self.insecure and self.token is None and not self.tokens and not is_loopback(self.host):
            raise ConfigError(
                f"host {self.host}: refusing to listen on a non-loopback address without --token "
                "(pass --insecure to do it anyway)")

    def token_for(self, service: str) -> str | None:
        """The token a request to `service` must carry, or None when none is configured."""
        return self.tokens.get(service, self.token)

    def default_policy(self) -> Policy:
        """The delivery policies of a queue whose service has no ``[services.NAME]`` table."""
        return Policy(self.max_deliveries, self.retry_backoff, self.dedup_window, self.delivery_timeout)

    def policy_for(self, service: str) -> Policy:
        """The delivery policies of ``service``'s queues (checked at start: never raises)."""
        table = self.services.get(service)
        default = self.default_policy()
        return default if not table else default.merged(table, f"services.{service}")

    def redacted_backend(self) -> str:
        """``backend`` as it may be shown (logs, errors, listings): its password as ``***``."""
        return redact_url(self.backend)

    def __repr__(self) -> str:
        """The dataclass repr, but with `redacted_backend()`: a Config in a log line or a
        traceback never shows the Redis password."""
        shown = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        shown["backend"] = self.redacted_backend()
        return f"Config({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


BACKEND_SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster", "redis+sentinel")
_BACKEND_FORM = ("redis://[user:password@]host[:port][/db], rediss://..., "
                 "redis+cluster://host:port[,host:port...] or redis+sentinel://host:port[,host:port...]/PRIMARY[/db]")
_HOST_PORT = re.compile(r"(\[[^\]]*\]|[^:\[\]]*)(?::(.*))?", re.DOTALL)


def check_backend_url(url: str) -> None:
    """Check a Redis URL completely, so that a typo is a one-line error at start-up rather than a
    client that connects somewhere else or silently drops a part: scheme ``redis`` or ``rediss``
    (one server), ``redis+cluster``/``rediss+cluster`` (a Redis Cluster: its seed nodes) or
    ``redis+sentinel`` (Sentinels, then the primary's name in the path), in lower case; hosts, each
    with a port from 1 to 65535 if given (a comma-separated list only for cluster and sentinel); a
    database that is a non-negative integer if given (not for a cluster); and nothing else (no
    query, no fragment). Messages show the URL through `redact_url`.

    Raises:
        ConfigError: one line naming ``backend`` and what is wrong.
    """
    shown = redact_url(url)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in BACKEND_SCHEMES:
        raise ConfigError(f"backend: expected {_BACKEND_FORM}, got {shown!r}")
    userinfo, _, rest = rest.rpartition("@")
    if any(c in userinfo for c in "/?#"):   # a URL parser would end the host there: mis-parsed
        raise ConfigError(f"backend: percent-encode '/', '?' and '#' in the user name and password "
                          f"(%2F, %3F, %23) in {shown!r}")
    if any(c.isspace() for c in rest):
        raise ConfigError(f"backend: white space in {shown!r}")
    hostports, path, query, fragment = _split_location(rest)
    if query or fragment:
        raise ConfigError(f"backend: no query (?...) or fragment (#...) is accepted, got {shown!r}")
    many = "+" in scheme
    if "," in hostports and not many:
        raise ConfigError(f"backend: several hosts need redis+cluster:// or redis+sentinel://, got {shown!r}")
    for hostport in hostports.split(",") if many else [hostports]:
        _check_host_port(hostport, shown)
    parts = path[1:].split("/") if path[1:] else []
    if scheme.endswith("+sentinel"):
        if not parts or not parts[0]:
            raise ConfigError(f"backend: name the primary after the Sentinels (redis+sentinel://host:port/PRIMARY), "
                              f"got {shown!r}")
        primary, parts = parts[0], parts[1:]
    if scheme.endswith("+cluster") and parts and parts != ["0"]:
        raise ConfigError(f"backend: a Redis Cluster has only database 0, got {shown!r}")
    if len(parts) > 1 or parts and not (parts[0].isascii() and parts[0].isdigit()):
        raise ConfigError(f"backend: database {'/'.join(parts)!r} is not a non-negative integer in {shown!r}")


def _check_host_port(hostport: str, shown: str) -> None:
    match = _HOST_PORT.fullmatch(hostport)
    if match is None:
        raise ConfigError(f"backend: {hostport!r} is not host[:port] in {shown!r}")
    host, port = match.groups()
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(f"backend: {host} is not an IPv6 address in {shown!r}") from None
    if not host:
        raise ConfigError(f"backend: no host in {shown!r} (expected {_BACKEND_FORM})")
    if port is not None and not (port.isascii() and port.isdigit() and len(port) <= 5
                                 and 1 <= int(port) <= 65535):
        raise ConfigError(f"backend: port {port!r} is not a number from 1 to 65535 in {shown!r}")


def _split_location(rest: str) -> tuple[str, str, str, str]:
    """``host:port/db?query#fragment`` -> its four parts (each "" when absent)."""
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    hostport, slash, path = rest.partition("/")
    return hostport, slash + path, query, fragment


def redact_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***`` (the user name kept).

    Works on any string, valid URL or not, so that an error message quoting a mistyped URL does
    not print the password either: everything between the user name's ``:`` and the last ``@``
    is masked.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, location = rest.rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}{':***' if colon else ''}@{location}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _coerce(name: str, value: Any) -> Any:
    """Convert a string (environment, flag) or TOML value to the field's type."""
    if value is None:
        return None
    kind = _FIELDS[name].type
    try:
        if name == "data_dir":
            return Path(value)
        if name == "queues":
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        if name == "tokens":
            if isinstance(value, str):
                pairs = (item.split("=", 1) for item in value.split(",") if item.strip())
                return {k.strip(): v.strip() for k, v in pairs}
            return {str(k): str(v) for k, v in dict(value).items()}
        if name in _policy.POLICY_KEYS:
            return _policy.coerce(name, value)
        if name == "services":
            return {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in dict(value).items()}
        if kind == "bool":
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(value)
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return str(value)
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: invalid value {value!r}") from None


def load_config(flags: Mapping[str, Any] | None = None, *, environ: Mapping[str, str] | None = None,
                config_file: str | os.PathLike | None = None) -> Config:
    """Build a `Config`: defaults, then the TOML file, then `QSERVE_*` variables, then flags.

    Args:
        flags: values given on the command line (None values are ignored).
        environ: the environment to read (defaults to `os.environ`).
        config_file: a TOML file; also taken from `QSERVE_CONFIG` when not given.

    Raises:
        ConfigError: a file, variable or flag is invalid.
    """
    environ = os.environ if environ is None else environ
    if "QSERVE_NO_AIO" in environ:   # read by earlier versions: refuse rather than silently ignore it
        raise ConfigError("QSERVE_NO_AIO is no longer read: use --fsync-backend threads "
                          "(QSERVE_FSYNC_BACKEND=threads)")
    values: dict[str, Any] = {}
    config_file = config_file or environ.get("QSERVE_CONFIG")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {config_file}: {exc}") from None
        for key, value in doc.items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"config file {config_file}: unknown setting {key!r}")
            values[name] = _coerce(name, value)
    for name in _FIELDS:
        env = environ.get("QSERVE_" + name.upper())
        if env is not None:
            values[name] = _coerce(name, env)
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value)
    return Config(**values)
