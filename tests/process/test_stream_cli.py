"""`qserve stream ...` (the eascmd stream commands) end to end: subprocesses against a real server."""

from __future__ import annotations

import json
import re
import signal
import stat
import subprocess
import sys

import pytest

from qserve import cli as qserve_cli
from qserve.client import BlockingQueueClient

from ..helpers.stream_cli import TIMEOUT, make_cli


@pytest.fixture
def cli(tmp_path, server, service):
    """Run `qserve stream ARGS` with a config directory of this test's own, configured for `service`."""
    return make_cli(tmp_path, f"{server.url}/api/predict/{service}", server.token)


def queue(server, service) -> BlockingQueueClient:
    return BlockingQueueClient(f"{server.url}/api/predict/{service}", token=server.token)


def test_config_file_and_info(cli, server, service):
    cli.config.unlink()
    assert cli("config", "--url", cli.url, "--token", server.token).stdout == f"[OK] config saved: {cli.config}\n"
    saved = json.loads(cli.config.read_text())
    assert saved == {"url": cli.url, "token": server.token}
    assert stat.S_IMODE(cli.config.stat().st_mode) == 0o600
    with queue(server, service) as q:
        q.put(b"abc")
    human, as_json, sink = cli.many([(("info",), ""), (("info", "--json"), ""),
                                     (("info", "--json", "--url", cli.url + "/sink"), "")])
    lines = human.stdout.splitlines()
    assert lines[0] == "[OK] Attributes: "
    keys = [line.split(" : ")[0] for line in lines[1:]]
    assert keys == sorted(keys) and f"meta.name : {service}" in lines and "stream.length : 1" in lines
    assert json.loads(as_json.stdout)["attributes"]["stream.lastEntry"] == "1"
    # every command overrides the saved settings
    assert json.loads(sink.stdout)["attributes"]["meta.name"] == f"{service}/sink"


def test_put_data_and_file(cli, server, service, tmp_path):
    out = cli("put", "-d", "abc", "--tags", "a=b", "--tags", "c=d", "--priority", "1").stdout.splitlines()
    rid = re.fullmatch(r"\[OK\] 1 requestId=([0-9a-f-]{36})", out[0]).group(1)
    assert out[1] == "[INFO] Put data done."
    assert re.fullmatch(r"Total time cost: [0-9.]+(ms|µs|s)", out[2])
    assert out[3:] == ["Total size: 3.00 B", "Total: 1, success: 1, failed: 0"]
    data = tmp_path / "test.data"
    data.write_bytes(b"one\r\ntwo\n\nfour\n")
    out = cli("put", "-f", str(data)).stdout.splitlines()
    assert out[0] == f"[INFO] Opening data file: {data}"
    assert [line.split(" requestId=")[0] for line in out[1:5]] == ["[OK] 2", "[OK] 3", "[OK] 4", "[OK] 5"]
    assert len({line.split(" requestId=")[1] for line in out[1:5]}) == 4
    assert out[-2:] == ["Total size: 10.00 B", "Total: 4, success: 4, failed: 0"]
    lines = [json.loads(line) for line in cli("put", "--json", "-f", str(data)).stdout.splitlines()]
    assert [d["index"] for d in lines[:4]] == [6, 7, 8, 9] and len(lines[0]["request_id"]) == 36
    assert lines[4]["total"] == 4 and lines[4]["failed"] == 0
    with queue(server, service) as q:
        entries = q.get(length=5, auto_delete=False)
        assert q.count(priority=1) == 1
    assert [e.data for e in entries] == [b"abc", b"one", b"two", b"", b"four"]
    assert entries[0].tags["requestId"] == rid
    assert (entries[0].tags["a"], entries[0].tags["c"]) == ("b", "d")


def test_put_file_reports_failed_lines(cli, tmp_path):
    data = tmp_path / "big.data"
    data.write_bytes(b"ok\n" + b"x" * (524288 + 1) + b"\nok2\n")
    proc = cli("put", "-f", str(data), check=1)
    assert proc.stdout.splitlines()[-1] == "Total: 3, success: 2, failed: 1"
    assert proc.stderr.startswith("[ERROR] entry 2: 413 ")


def test_get_formats_keep_sink_and_no_data(cli, server, service):
    with queue(server, service) as q:
        _, rid = q.put(b"hello", {"b": "2", "a": "1"})
        q.put(b"world")
        q.sink().put(b"result", {"requestId": rid})
    out = cli("get", "-l10", "--keep").stdout.splitlines()
    assert len(out) == 2
    m = re.fullmatch(r"\[OK\] \[0 - 1\] tags\[a=1 b=2 requestId=(\S+) ts@source=\d+\] hello", out[0])
    assert m and m.group(1) == rid
    assert out[1].startswith("[OK] [1 - 2] tags[requestId=") and out[1].endswith("] world")
    by_tag, sink = cli.many([(("get", "--tags", "a=1"), ""), (("get", "-k", "--json"), "")])
    assert by_tag.stdout.startswith("[OK] [0 - 1] tags[a=1 ")                     # and deleted
    [sink] = [json.loads(line) for line in sink.stdout.splitlines()]
    assert (sink["index"], sink["data"], sink["tags"]["requestId"]) == (1, "result", rid)
    gone, by_index = cli.many([(("get", "--tags", "a=1"), ""), (("get", "--index", "2", "--timeout", "100ms"), "")])
    assert gone.stdout == "[INFO] no data\n" and by_index.stdout.endswith("] world\n")
    assert cli("get", "--timeout", "0.1").stdout == "[INFO] no data\n"


def test_get_by_request_id(cli, server, service):
    with queue(server, service) as q:
        rids = [q.put(f"e{i}".encode())[1] for i in range(3)]
        q.sink().put(b"result-1", {"requestId": rids[1]})
    kept, result = cli.many([(("get", "--request-id", rids[1], "--keep", "-l", "10"), ""),
                             (("get", "-k", "--request-id", rids[1], "--timeout", "5s", "--json"), "")])
    [line] = kept.stdout.splitlines()
    assert line.startswith("[OK] [0 - 2] tags[") and f"requestId={rids[1]} " in line and line.endswith("] e1")
    [got] = [json.loads(line) for line in result.stdout.splitlines()]
    assert (got["index"], got["data"], got["tags"]["requestId"]) == (1, "result-1", rids[1])
    assert cli("get", "--request-id", rids[1]).stdout.endswith("] e1\n")              # and deleted
    assert cli("get", "--request-id", rids[1]).stdout == "[INFO] no data\n"
    with queue(server, service) as q:
        assert [e.data for e in q.get(length=10, auto_delete=False)] == [b"e0", b"e2"]
        assert q.sink().count() == 0


def test_bare_config_shows_the_settings_in_force(cli, monkeypatch, capsys):
    monkeypatch.setenv("QSERVE_CONFIG_DIR", cli.env["QSERVE_CONFIG_DIR"])   # in process: same parser, same main
    assert qserve_cli.main(["stream", "config"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"[OK] config: {cli.config}", f"url : {cli.url}", "token : te****",
        "group : default_group (default)", "user : default_user (default)",
        "request_timeout : 10s (--request-timeout, not saved)"]
    cli.config.write_text(json.dumps({"url": cli.url, "token": "short", "group": "g"}))
    assert qserve_cli.main(["stream", "config", "--json", "--request-timeout", "2.5"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "config": str(cli.config), "exists": True, "url": cli.url, "token": "****", "group": "g",
        "user": "default_user", "request_timeout": 2.5}
    cli.config.unlink()
    assert qserve_cli.main(["stream", "config"]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == [
        f"[OK] config: {cli.config} (not written yet)", "url : (not set)", "token : (not set)"]
    assert qserve_cli.main(["stream", "config", "--user", "u"]) == 1      # a flag saves, and needs a URL
    assert capsys.readouterr().err == "[ERROR] config needs --url\n"


def test_delete_and_trunc_ask_first(cli, server, service):
    with queue(server, service) as q:
        for i in range(6):
            q.put(str(i).encode())
    no, yes, unasked, eof = cli.many([(("delete", "3"), "n\n"), (("delete", "3"), "y\n"),
                                      (("delete", "1", "2", "-y"), ""), (("trunc", "5"), "")])
    assert no.stdout == "Deleting index(es):\n3 [y/N][INFO] cancelled\n"
    assert yes.stdout == "Deleting index(es):\n3 [y/N][OK] deleted\n"
    assert unasked.stdout == "[OK] deleted\n"
    assert eof.stdout == "trunc stream from index: 5 [y/N]\n[INFO] cancelled\n"
    with queue(server, service) as q:
        assert q.count() == 3
    assert cli("trunc", "5", input="Y\n").stdout == "trunc stream from index: 5 [y/N][OK] truncated\n"
    assert json.loads(cli("trunc", "6", "-y", "--json").stdout) == {"truncated": 6}
    with queue(server, service) as q:
        attrs = q.attributes()
    assert (attrs["stream.firstEntry"], attrs["stream.length"]) == ("6", "1")


def test_watch_prompts_commit_and_negative(cli, server, service):
    q = queue(server, service)
    try:
        q.put(b"a")
        q.put(b"b")
        # 1: commit (empty answer); 2: no commit, negative yes -> redelivered; 2 again: commit
        proc = cli("watch", "--window", "1", "-n", "3", input="\nn\ny\ny\n")
        lines = proc.stdout.split("\n")
        assert lines[0] == "[INFO] Start to watch: index: 0, indexOnly: false, autoCommit: false, window: 1"
        assert lines[1].startswith("[OK] [0 - 1] tags[") and lines[1].endswith("] a")
        assert lines[2].startswith("commit: 1 ? [Y/n][OK] [1 - 2] tags[")
        assert lines[3].startswith("commit: 2 ? [Y/n]negative: 2 ? [Y/n][OK] [2 - 2] tags[lastCode= ")
        assert lines[4] == "commit: 2 ? [Y/n]"
        assert q.count() == 0
        q.put(b"c")
        # end of input stops the watch without committing
        assert cli("watch", input="").stdout.endswith("] c\ncommit: 3 ? [Y/n]\n")
        out = cli("watch", "--commit-all", "-n", "1", "--json").stdout
        events = [json.loads(line) for line in out.splitlines()]
        assert events[0]["watch"]["window"] == 10
        assert (events[1]["index"], events[1]["data"]) == (3, "c") and events[2] == {"index": 3, "action": "commit"}
        q.put(b"d", {"k": "v"})
        out = cli("watch", "--auto-commit", "--index-only", "--tags", "k=v", "-n", "1").stdout.splitlines()
        assert out[0].endswith("autoCommit: true, window: 10")
        assert re.fullmatch(r"\[OK\] \[0 - 4\] tags\[k=v .*\] ", out[1])
        assert q.count() == 0
    finally:
        q.close()


def test_watch_stops_cleanly_on_ctrl_c(cli):
    proc = subprocess.Popen([sys.executable, "-m", "qserve", "stream", "watch"], env=cli.env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().startswith("[INFO] Start to watch:")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err


def test_errors_are_one_line(cli, tmp_path, monkeypatch, capsys):
    [proc] = cli.many([(("info", "--url", "http://127.0.0.1:1/api/predict/x"), "")])    # one end to end
    assert (proc.returncode, proc.stderr) == (1, "[ERROR] cannot reach http://127.0.0.1:1: connection refused\n")
    # the rest in process (interpreter start-up dominates this file's runtime): same parser, same main
    monkeypatch.setenv("QSERVE_CONFIG_DIR", cli.env["QSERVE_CONFIG_DIR"])
    lines = tmp_path / "lines.data"
    lines.write_text("a\nb\n")
    for args, expected in [
        (("put", "-d", "x", "--token", "wrong"), "[ERROR] 401 unauthorized: missing or wrong token"),
        (("put", "-f", str(lines), "--token", "wrong"), "[ERROR] 401 unauthorized: "),   # stops at once
        (("info", "--url", "ftp://host/x"), "[ERROR] bad URL 'ftp://host/x'"),
        (("put", "-f", str(tmp_path / "missing")), "[ERROR] cannot open "),
        (("watch", "--token", "wrong"), "[ERROR] 401 unauthorized: "),
        (("info", "-k", "--url", cli.url + "/sink"), "[ERROR] "),
    ]:
        assert qserve_cli.main(["stream", *args]) == 1, args
        err = capsys.readouterr().err
        assert err.startswith(expected) and err.count("\n") == 1, (args, err)
    # a put -f that an error stops still says what became of every line
    assert qserve_cli.main(["stream", "put", "-f", str(lines), "--token", "wrong"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "[INFO] Put data stopped." and out[-1] == "Total: 1, success: 0, failed: 1, not sent: 1"
    for args in [("get", "--timeout", "3x"), ("put",), ("delete",), ("get", "-l", "0"), ("put", "-d", "x", "--tags", "k")]:
        with pytest.raises(SystemExit) as info:
            qserve_cli.main(["stream", *args])
        assert info.value.code == 2 and capsys.readouterr().err.startswith("usage: "), args
    cli.config.unlink()
    assert qserve_cli.main(["stream", "info"]) == 1
    assert capsys.readouterr().err.startswith('[ERROR] no queue URL: run "qserve stream config')
