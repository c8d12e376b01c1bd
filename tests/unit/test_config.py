"""Configuration: defaults < TOML file < environment < flags, and one-line errors."""

import dataclasses
import re
from pathlib import Path

import pytest

from qserve.cli import build_parser
from qserve.config import Config, ConfigError, load_config


def test_defaults_are_embedded():
    cfg = load_config({}, environ={})
    assert (cfg.host, cfg.port, cfg.data_dir, cfg.fsync, cfg.max_payload_bytes) == \
        ("127.0.0.1", 8080, Path("qserve-data"), "always", 524288)


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "q.toml"
    f.write_text('port = 9000\nfsync = "interval"\nqueues = ["a", "b"]\n[tokens]\na = "ta"\n')
    cfg = load_config({}, environ={}, config_file=f)
    assert (cfg.port, cfg.fsync, cfg.queues, cfg.token_for("a"), cfg.token_for("b")) == \
        (9000, "interval", ("a", "b"), "ta", None)
    cfg = load_config({}, environ={"QSERVE_PORT": "9001", "QSERVE_TOKEN": "all"}, config_file=f)
    assert (cfg.port, cfg.token_for("b"), cfg.token_for("a")) == (9001, "all", "ta")
    cfg = load_config({"port": 9002, "fsync": None}, environ={"QSERVE_PORT": "9001"}, config_file=f)
    assert (cfg.port, cfg.fsync) == (9002, "interval")


@pytest.mark.parametrize("flags,env,needle", [
    ({"fsync": "sometimes"}, {}, "fsync"),
    ({}, {"QSERVE_PORT": "eighty"}, "port"),
    ({"max_payload_bytes": 0}, {}, "max_payload_bytes"),
    ({"host": "10.1.2.3"}, {}, "non-loopback"),
    ({"queues": "a,b/c"}, {}, "service name"),
    ({"idle_poll_us": -1}, {}, "idle_poll_us"),
    ({}, {"QSERVE_IDLE_POLL_US": "100001"}, "idle_poll_us"),
])
def test_invalid_settings_are_one_line(flags, env, needle):
    with pytest.raises(ConfigError) as info:
        load_config(flags, environ=env)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_non_loopback_allowed_with_token_or_insecure():
    assert load_config({"host": "0.0.0.0", "token": "t"}, environ={}).host == "0.0.0.0"
    assert load_config({"host": "0.0.0.0", "insecure": True}, environ={}).insecure
    assert Config(host="::1").host == "::1"


def test_unknown_file_key(tmp_path):
    f = tmp_path / "q.toml"
    f.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config({}, environ={}, config_file=f)


EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "qserve.toml"
_SETTING = re.compile(r"^(?:# )?(?:([a-z_]+) = |\[([a-z_]+)\]\s*$)")


def _documented(text: str) -> dict[str, str]:
    """Setting name -> the comment block right above its line (set, or commented out as
    `# key = value`; a table as `[key]`)."""
    lines = text.splitlines()
    found = {}
    for i, line in enumerate(lines):
        m = _SETTING.match(line)
        if m:
            j = i
            while j > 0 and lines[j - 1].startswith("#") and not _SETTING.match(lines[j - 1]):
                j -= 1
            found[m.group(1) or m.group(2)] = "\n".join(lines[j:i])
    return found


def test_example_config_loads_and_holds_the_defaults():
    """docs/qserve.toml loads, and what it sets is what the server uses when nothing is set."""
    loaded = load_config(config_file=EXAMPLE, environ={})
    assert dataclasses.asdict(loaded) == dataclasses.asdict(Config())


def test_example_config_documents_every_setting():
    """A new Config field fails here until docs/qserve.toml names it, with a comment giving its
    default."""
    documented = _documented(EXAMPLE.read_text())
    missing = [f.name for f in dataclasses.fields(Config) if f.name not in documented]
    assert not missing, f"docs/qserve.toml does not list these settings: {missing}"
    undescribed = [name for name, comment in documented.items() if "Default:" not in comment]
    assert not undescribed, f"docs/qserve.toml: no comment with 'Default:' above {undescribed}"
    unknown = sorted(set(documented) - {f.name for f in dataclasses.fields(Config)})
    assert not unknown, f"docs/qserve.toml names settings Config does not have: {unknown}"


@pytest.mark.parametrize("flag,name", [("--no-auto-create", "auto_create"), ("--no-fsync-poll", "fsync_poll")])
def test_a_switch_on_by_default_is_a_flag_a_variable_and_a_setting(tmp_path, flag, name):
    args = build_parser().parse_args(["serve", flag])
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    assert getattr(load_config(flags, environ={}), name) is False
    assert getattr(load_config({}, environ={}), name) is True
    assert getattr(load_config({}, environ={f"QSERVE_{name.upper()}": "false"}), name) is False
    toml = tmp_path / "qserve.toml"
    toml.write_text(f"{name} = false\n")
    assert getattr(load_config({}, environ={}, config_file=toml), name) is False


def test_the_retired_no_aio_variable_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="QSERVE_NO_AIO is no longer read: use --fsync-backend threads"):
        load_config(environ={"QSERVE_NO_AIO": "1"})


# -- the Redis backend's settings -------------------------------------------------------------

def test_redis_settings_from_file_env_and_flags(tmp_path):
    """The four settings go through the generic loader: TOML keys, QSERVE_* variables, flags."""
    f = tmp_path / "q.toml"
    f.write_text('backend = "redis://10.0.0.5:6380/2"\nredis_wait = 1\nredis_wait_timeout = 0.5\n'
                 'node_lease = 30\n')
    cfg = load_config({}, environ={}, config_file=f)
    assert (cfg.backend, cfg.redis_wait, cfg.redis_wait_timeout, cfg.node_lease) == \
        ("redis://10.0.0.5:6380/2", 1, 0.5, 30.0)
    env = {"QSERVE_BACKEND": "rediss://cache:6379", "QSERVE_REDIS_WAIT": "2",
           "QSERVE_REDIS_WAIT_TIMEOUT": "2.5", "QSERVE_NODE_LEASE": "15"}
    cfg = load_config({}, environ=env, config_file=f)
    assert (cfg.backend, cfg.redis_wait, cfg.redis_wait_timeout, cfg.node_lease) == \
        ("rediss://cache:6379", 2, 2.5, 15.0)
    cfg = load_config({"backend": "redis://127.0.0.1", "redis_wait": 0, "redis_wait_timeout": 3.0,
                       "node_lease": 4.0}, environ=env, config_file=f)
    assert (cfg.backend, cfg.redis_wait, cfg.redis_wait_timeout, cfg.node_lease) == \
        ("redis://127.0.0.1", 0, 3.0, 4.0)
    assert load_config({}, environ={"QSERVE_BACKEND": ""}).backend == ""   # empty: the local log


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1",
    "redis://localhost:6379",
    "redis://redis.internal:6379/0",
    "rediss://cache.example.com:6380/15",
    "redis://[::1]:6379/3",
    "redis://user:pw@host:1",
    "redis://:pw@host:65535",
    "redis://user@host",
    "redis://u:p%2Fw@host/",
    "redis://u:p@ss@host/2",          # '@' in the password: the last '@' ends the user part
    "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
    "rediss+cluster://a:7000/0",
    "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster",
    "redis+sentinel://:pw@s1:26379/mymaster/2",
])
def test_valid_backend_urls(url):
    assert load_config({"backend": url}, environ={}).backend == url


@pytest.mark.parametrize("url,needle", [
    ("http://x", "expected redis://[user:password@]host[:port][/db], rediss://..., redis+cluster://host:port"
                 "[,host:port...] or redis+sentinel://host:port[,host:port...]/PRIMARY[/db], got 'http://x'"),
    ("REDIS://host", "expected redis://"),
    ("host:6379", "expected redis://"),
    ("redis:/host", "expected redis://"),
    ("redis://host:notaport", "port 'notaport' is not a number from 1 to 65535 in 'redis://host:notaport'"),
    ("redis://host:0", "port '0' is not a number from 1 to 65535"),
    ("redis://host:65536", "port '65536' is not a number from 1 to 65535"),
    ("redis://host:-1", "port '-1'"),
    ("redis://host:+80", "port '+80'"),
    ("redis://host:", "port ''"),
    ("redis://host:" + "9" * 5000, "is not a number from 1 to 65535"),
    ("redis://", "no host in 'redis://'"),
    ("redis:///0", "no host in 'redis:///0'"),
    ("redis://:6379", "no host"),
    ("redis://host/db1", "database 'db1' is not a non-negative integer"),
    ("redis://host/-1", "database '-1'"),
    ("redis://host/0/1", "database '0/1'"),
    ("redis://host/0?ssl=1", "no query (?...) or fragment (#...) is accepted"),
    ("redis://host#x", "no query"),
    ("redis://[::1", "is not host[:port]"),
    ("redis://[nothex]:6379", "[nothex] is not an IPv6 address"),
    ("redis://ho st:6379", "white space"),
    ("redis://a:1,b:2", "several hosts need redis+cluster:// or redis+sentinel://"),
    ("redis+cluster://a:1,b:x", "port 'x'"),
    ("redis+cluster://a:1/3", "a Redis Cluster has only database 0"),
    ("redis+sentinel://s:26379", "name the primary after the Sentinels"),
    ("redis+sentinel://s:26379/p/x", "database 'x'"),
])
def test_invalid_backend_urls_are_one_line_naming_the_setting(url, needle):
    with pytest.raises(ConfigError) as info:
        load_config({"backend": url}, environ={})
    message = str(info.value)
    assert message.startswith("backend: ") and needle in message and "\n" not in message


@pytest.mark.parametrize("flags,needle", [
    ({"redis_wait": -1}, "redis_wait: must be >= 0"),
    ({"redis_wait_timeout": 0}, "redis_wait_timeout: must be > 0"),
    ({"node_lease": -5}, "node_lease: must be > 0"),
    ({"redis_wait": "two"}, "redis_wait: invalid value 'two'"),
    ({"node_lease": "10s"}, "node_lease: invalid value '10s'"),
])
def test_invalid_redis_numbers(flags, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(flags, environ={})


@pytest.mark.parametrize("url,shown", [
    ("redis://user:s3cret@host:6379/1", "redis://user:***@host:6379/1"),
    ("rediss://:s3cret@host", "rediss://:***@host"),
    ("redis://u:s3:cr@et@host", "redis://u:***@host"),
    ("redis://user@host", "redis://user@host"),          # a user name alone is no secret
    ("redis://host:6379", "redis://host:6379"),
    ("", ""),
])
def test_redacted_backend(url, shown):
    cfg = Config(backend=url)
    assert cfg.redacted_backend() == shown
    assert "s3" not in repr(cfg) and f"backend={shown!r}" in repr(cfg)


@pytest.mark.parametrize("url", [
    "redis://user:s3cret@host:notaport",
    "http://user:s3cret@host",
    "user:s3cret@host:6379",                 # the scheme forgotten
    "redis://user:s3c/ret@host:6379",        # an unencoded '/' would make a parser take "s3c" as the port
    "redis://user:s3cret@host:6379/x",
    "redis://user:s3cret@host?db=1",
    "redis://:s3cret@",
])
def test_the_password_of_a_bad_url_is_not_in_the_error(url):
    with pytest.raises(ConfigError) as info:
        load_config({"backend": url}, environ={})
    assert "s3" not in str(info.value) and "***" in str(info.value)
