"""Configuration: defaults < TOML file < environment < flags, and one-line errors."""

import dataclasses
import re
from pathlib import Path

import pytest

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


def test_the_retired_no_aio_variable_is_refused_not_ignored():
    with pytest.raises(ConfigError, match="QSERVE_NO_AIO is no longer read: use --fsync-backend threads"):
        load_config(environ={"QSERVE_NO_AIO": "1"})
