"""Configuration: defaults < TOML file < environment < flags, and one-line errors."""

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
