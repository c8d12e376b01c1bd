"""The `qserve` command's last line of defence: whatever escapes a subcommand is one line."""

from __future__ import annotations

import pytest

from qserve import cli


def _boom(args, argv):
    raise RuntimeError("it broke\nacross two lines")


def _interrupted(args, argv):
    raise KeyboardInterrupt


def test_an_unexpected_error_is_one_line(monkeypatch, capsys):
    monkeypatch.delenv("QSERVE_LOG_LEVEL", raising=False)
    monkeypatch.setattr(cli, "_serve", _boom)
    assert cli.main(["serve"]) == cli.EX_SOFTWARE
    err = capsys.readouterr().err
    assert err == ("qserve serve: unexpected error: RuntimeError: it broke across two lines "
                   "(--log-level DEBUG shows the traceback)\n")


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_adds_the_traceback(monkeypatch, capsys, how):
    monkeypatch.setattr(cli, "_serve", _boom)
    argv = ["serve"]
    if how == "flag":
        argv += ["--log-level", "DEBUG"]
    else:
        monkeypatch.setenv("QSERVE_LOG_LEVEL", "debug")
    assert cli.main(argv) == cli.EX_SOFTWARE
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.endswith("shows the traceback)\n")


def test_an_interrupt_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_serve", _interrupted)
    assert cli.main(["serve"]) == 130
    assert capsys.readouterr().err == "qserve serve: interrupted\n"
