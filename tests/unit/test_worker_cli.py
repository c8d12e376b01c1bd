"""The worker's pieces without a server: result encoding, the demo handler, handler loading, service
names, and `qserve worker`'s refusals of bad handlers, settings and URLs (one line, exit 2) and of
an unexpected error (one line unless --log-level DEBUG). The worker against real servers:
tests/process/test_worker.py."""

from __future__ import annotations

import logging

import pytest

from qserve import cli
from qserve.config import Config, ConfigError
from qserve.server.embedded import embedded_service
from qserve.worker import Retryable
from qserve.worker.cli import service_of
from qserve.worker.handler import HandlerSpecError, demo, encode_result, load_handler


# ------------------------------------------------------------------------------ pieces

def test_encode_result():
    assert encode_result(b"raw") == (b"raw", None)
    assert encode_result("héllo") == ("héllo".encode(), "text/plain; charset=utf-8")
    assert encode_result({"a": [1, 2]}) == (b'{"a": [1, 2]}', "application/json")
    assert encode_result([{"p_0": 0.5}]) == (b'[{"p_0": 0.5}]', "application/json")
    assert encode_result(None) == (b"", None)
    with pytest.raises(TypeError):
        encode_result(3.5)


def test_demo_is_stable_and_sums_to_one():
    for data in (b"", b"a", b"hello", bytes(range(256))):
        [probs] = demo(data, {})
        assert probs == demo(data, {"other": "tags"})[0]
        assert 0 < probs["p_0"] < 1 and round(probs["p_0"] + probs["p_1"], 9) == 1


def test_load_handler():
    assert load_handler("demo").fn is demo
    h = load_handler("tests.helpers.handlers:async_length")
    assert h.is_async and not load_handler("tests.helpers.handlers:dispatch").is_async
    for bad in ("nocolon", "tests.helpers.handlers:missing", "no_such_module_x:f", ":f",
                "tests.helpers.handlers:Unavailable.code"):
        with pytest.raises(HandlerSpecError):
            load_handler(bad)
    assert Retryable("x").code == "Retry" and Retryable("x", code="Later").code == "Later"


def test_service_names():
    assert service_of("http://h:1/api/predict/grp.svc") == "grp.svc"
    assert service_of("http://h:1/api/predict/svc/") == "svc"
    assert service_of("http://h:1/") == "default"
    assert embedded_service(Config(root_service="r", queues=("a", "b"))) == "r"
    assert embedded_service(Config(queues=("only",))) == "only"
    assert embedded_service(Config()) == "default"
    with pytest.raises(ConfigError):
        embedded_service(Config(queues=("a", "b")))


def test_cli_refuses_bad_handler_and_settings(capsys):
    assert cli.main(["worker", "--url", "http://127.0.0.1:1/api/predict/s", "--handler", "nope"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err
    assert cli.main(["worker", "--url", "http://127.0.0.1:1/api/predict/s", "--handler", "demo",
                     "--concurrency", "0"]) == 2
    assert cli.main(["worker", "--url", "ftp://x/api/predict/s", "--handler", "demo"]) == 2


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:1/api/predict/demo/sink",
     "the worker watches a service's input queue; --url names a sink (http://127.0.0.1:1/api/predict/demo/sink): "
     "use http://127.0.0.1:1/api/predict/demo"),
    ("http://127.0.0.1:1/sink", "the worker watches a service's input queue; --url names a sink "
                                "(http://127.0.0.1:1/sink): use http://127.0.0.1:1/"),
    ("127.0.0.1:1/api/predict/demo",
     "bad URL '127.0.0.1:1/api/predict/demo': expected http://host:port/api/predict/SERVICE"),
    ("http://127.0.0.1:99999/api/predict/demo", "bad URL 'http://127.0.0.1:99999/api/predict/demo': "
                                                "Port out of range 0-65535"),
    ("http://127.0.0.1:x/api/predict/demo", "bad URL 'http://127.0.0.1:x/api/predict/demo': "
                                            "Port could not be cast to integer value as 'x'"),
    ("http://127.0.0.1:0/api/predict/demo", "bad URL 'http://127.0.0.1:0/api/predict/demo': port 0 names no server"),
    ("http://127.0.0.1:1/api/predict/", "bad URL 'http://127.0.0.1:1/api/predict/': no service after /api/predict/"),
    ("http://127.0.0.1:1/api/predict/demo?x=1", "bad URL 'http://127.0.0.1:1/api/predict/demo?x=1': "
                                                "no query or fragment allowed"),
])
def test_cli_refuses_wrong_urls_in_one_line(capsys, url, expected):
    assert cli.main(["worker", "--url", url, "--handler", "demo"]) == 2
    assert capsys.readouterr().err == f"qserve worker: {expected}\n"


def test_cli_refuses_control_characters_and_nan(capsys):
    url = "http://127.0.0.1:1/api/predict/s"
    assert cli.main(["worker", "--url", url, "--handler", "demo", "--token", "tok\n"]) == 2
    assert capsys.readouterr().err == ("qserve worker: --token contains a control character "
                                       "(a trailing newline?)\n")
    assert cli.main(["worker", "--url", url, "--handler", "demo", "--drain-seconds", "nan"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_handler_module_that_raises_on_import(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_at_import.py").write_text("raise RuntimeError('no GPU here\\nsecond line')\n")
    (tmp_path / "bad_syntax_handler.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    url = "http://127.0.0.1:1/api/predict/s"
    assert cli.main(["worker", "--url", url, "--handler", "broken_at_import:f"]) == 2
    assert capsys.readouterr().err == ("qserve worker: handler 'broken_at_import:f': importing broken_at_import "
                                       "failed: RuntimeError: no GPU here\n")
    assert cli.main(["worker", "--url", url, "--handler", "bad_syntax_handler:f"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qserve worker: handler 'bad_syntax_handler:f': importing bad_syntax_handler failed: "
                          "SyntaxError") and err.count("\n") == 1


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_cli_unexpected_error_is_one_line_unless_debug(monkeypatch, capfd, level):
    """Fault injection: whatever escapes the worker's trio run is one ERROR line; --log-level DEBUG
    adds the traceback."""
    from qserve.worker import cli as worker_module

    async def broken(args, handler):
        raise RuntimeError("something nobody expected\nwith a second line")

    monkeypatch.setattr(worker_module, "_standalone", broken)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = []                       # let main's basicConfig write to this test's stderr
    try:
        status = cli.main(["worker", "--url", "http://127.0.0.1:1/api/predict/s", "--handler", "demo",
                           "--log-level", level])
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("qserve.worker").setLevel(logging.NOTSET)
    err = capfd.readouterr().err
    assert status == 1
    assert "ERROR qserve.worker: worker failed: RuntimeError: something nobody expected" in err
    if level == "INFO":
        assert err.count("\n") == 1 and "(--log-level DEBUG shows the traceback)" in err
    else:
        assert "Traceback" in err and "with a second line" in err
