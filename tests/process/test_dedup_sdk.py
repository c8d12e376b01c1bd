"""An idempotent put through the official `eas_prediction` SDK (#17: ``--dedup-window``): a gateway
between the SDK and a real `qserve serve` loses the server's first answer (it forwards the put,
reads qserve's 200 and answers 504, as a load balancer whose upstream timed out does); the SDK
retries the put (it retries every non-2xx answer), and qserve answers the original index, stores
nothing more and says ``X-Qserve-Duplicate: 1``. Without the window the same retry stores the
entry twice (the control)."""

from __future__ import annotations

import http.client
import http.server
import threading

import pytest

from ..helpers import sdk
from ..helpers.process import ServerProcess

TIMEOUT = 10.0


class LossyGateway:
    """A one-thread HTTP gateway on 127.0.0.1 that loses the upstream's answer to the first POST
    (answers 504 instead) and passes everything else through. Stopped by `close()`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.lost: list[tuple[int, dict]] = []   # (status, headers) of the answers it lost
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:   # quiet
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                upstream = http.client.HTTPConnection("127.0.0.1", gateway.upstream_port, timeout=TIMEOUT)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                    upstream.request(self.command, self.path, body, headers)
                    answer = upstream.getresponse()
                    data = answer.read()
                    status, answer_headers = answer.status, dict(answer.getheaders())
                finally:
                    upstream.close()
                if self.command == "POST" and not gateway.lost:
                    gateway.lost.append((status, answer_headers))
                    status, answer_headers, data = 504, {"Content-Type": "text/plain"}, b"upstream timed out\n"
                self.send_response(status)
                for name, value in answer_headers.items():
                    if name.lower() not in ("content-length", "connection", "date", "server"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


class Via:
    """What `helpers.sdk.client` needs of a server: the gateway's endpoint and qserve's token."""

    def __init__(self, gateway: LossyGateway, srv: ServerProcess) -> None:
        self.endpoint, self.token = gateway.endpoint, srv.token


@pytest.mark.parametrize("window", ["5m", None])
def test_the_sdk_retrying_a_put_whose_answer_was_lost(tmp_path, window):
    srv = ServerProcess(tmp_path / "data", *(["--dedup-window", window] if window else [])).start()
    gateway = LossyGateway(srv.port)
    try:
        client = sdk.client(Via(gateway, srv), "orders")
        index, request_id = client.put(b"charge card 42", {"requestId": "payment-42"})
        assert request_id == "payment-42"
        assert len(gateway.lost) == 1 and gateway.lost[0][0] == 200     # the first put was stored
        direct = sdk.client(srv, "orders")
        length = int(direct.attributes()["stream.length"])
        if window:
            assert length == 1, "the retry stored the put again"
            assert index == "1"
            again, _ = direct.put(b"charge card 42", {"requestId": "payment-42"})
            assert again == "1" and int(direct.attributes()["stream.length"]) == 1
        else:   # the control: without the window the SDK's retry is a second entry
            assert length == 2 and index == "2"
    finally:
        gateway.close()
        assert srv.stop() == 0
