"""The bare trio+h11 server the benchmarks compare qserve with: it parses each request and answers.

    python -m tools.bench.bare --port 0     # what `bare_server_proc` starts

A POST gets a 200 with a counter as its body (an index, as qserve answers a put), a GET a fixed
protobuf-sized body, anything else a 204; nothing is stored. Its req/s is the ceiling of the same
stack without a queue behind it (the ratio column of `http`), its round trip at a given rate the
latency floor of `watch`.
"""

from __future__ import annotations

import argparse
import sys
import uuid

import h11
import trio

from qserve.wire.names import PROTOBUF

from . import lib as bl

BARE_GET_BODY = b"\x08\x01" + b"g" * 198


async def _connection(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    counter = 0
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.Request):
                raise h11.RemoteProtocolError("unexpected event")
            while True:   # read (and drop) the body
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(ev, h11.EndOfMessage):
                    break
                elif isinstance(ev, h11.ConnectionClosed):
                    return
            if event.method == b"POST":
                counter += 1
                body = str(counter).encode()
                headers = [(b"Content-Type", b"text/plain; charset=utf-8"),
                           (b"X-Eas-Queueservice-Request-Id", str(uuid.uuid4()).encode()),
                           (b"Content-Length", str(len(body)).encode())]
                status = 200
            elif event.method == b"GET":
                body = BARE_GET_BODY
                headers = [(b"Content-Type", PROTOBUF.encode()),
                           (b"Content-Length", str(len(body)).encode())]
                status = 200
            else:
                body, headers, status = b"", [], 204
            out = conn.send(h11.Response(status_code=status, headers=headers))
            if body:
                out += conn.send(h11.Data(data=body))
            out += conn.send(h11.EndOfMessage())
            await stream.send_all(out)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def serve(port: int) -> None:
    """Listen on 127.0.0.1:`port` (0 = ephemeral) and say where on stderr, as qserve does."""
    listeners = await trio.open_tcp_listeners(port, host=bl.LOCALHOST)
    print(f"bare server listening on http://{bl.LOCALHOST}:{listeners[0].socket.getsockname()[1]}",
          file=sys.stderr, flush=True)
    await trio.serve_listeners(_connection, listeners)


def bare_server_proc(cpu: int | None) -> bl.ServerProc:
    """This server as a child process, optionally pinned to `cpu`."""
    return bl.ServerProc("bare", [sys.executable, "-m", __spec__.name, "--port", "0"],
                         cpu=cpu)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0 = ephemeral, the default)")
    args = p.parse_args(argv)
    try:
        trio.run(serve, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
