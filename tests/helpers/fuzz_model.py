"""The model the HTTP fuzz tests check the server against: `QueueModel` tracks what the 200s did to
a queue (puts, deletes, truncates, commits, auto-deleting gets, end) and predicts every status, index,
get result, count and attribute of an `Op` (one request); `run_ops` sends operations (groups of them
pipelined on one connection) and checks every answer, `check_state` compares the full queue content."""

from __future__ import annotations

import base64
import json
import urllib.parse
from dataclasses import dataclass, field

from qserve.wire import protobuf

from .fuzz_wire import MAX_PAYLOAD, Answer, check_answer, exchange, parse_answers, render

@dataclass
class Stored:
    data: bytes
    tags: dict
    priority: int


@dataclass
class QueueModel:
    """What one queue holds after the 200s it was sent (no watchers: nothing is ever pending)."""

    entries: dict = field(default_factory=dict)    # index -> Stored
    next_index: int = 1
    ended: bool = False

    def live(self, start: int = 0):
        return [i for i in sorted(self.entries) if i >= start]

    def matching(self, start: int, tags: dict, priority: int | None = None) -> list[int]:
        return [i for i in self.live(start)
                if all(self.entries[i].tags.get(k) == v for k, v in tags.items())
                and (priority is None or self.entries[i].priority == priority)]

    def dispatch_order(self) -> list[int]:
        return sorted(self.entries, key=lambda i: (-self.entries[i].priority, i))

    def remove(self, indexes) -> None:
        for i in list(indexes):
            self.entries.pop(i, None)


class Model:
    def __init__(self) -> None:
        self.queues = {False: QueueModel(), True: QueueModel()}   # sink? -> queue


@dataclass
class Op:
    """One request. ``kind`` says what it is; the model predicts its answer and applies its 200."""

    kind: str
    method: bytes
    sink: bool = False
    subpath: str = ""
    params: list = field(default_factory=list)       # (name, value)
    headers: list = field(default_factory=list)      # (bytes, bytes)
    body: bytes = b""
    auth: str = "ok"                                 # ok | bearer | missing | wrong
    invalid: bool = False                            # a parameter is invalid on purpose: 400
    info: dict = field(default_factory=dict)

    def render(self, service: str) -> bytes:
        path = "/api/predict/" + urllib.parse.quote(service, safe=".-") + ("/sink" if self.sink else "")
        if self.subpath:
            path += "/" + self.subpath
        return render(self.method, path, self.params, self.headers, self.body, self.auth)


def rejection(op: Op, model: Model) -> set | None:
    """The statuses `op` must get when it is refused without any effect, or None when it is valid."""
    if op.kind == "elsewhere":
        return None
    if op.kind == "put" and len(op.body) > MAX_PAYLOAD:
        return {413}                               # the edge refuses before routing
    if op.kind == "garbage":
        expect = set(op.info["expect"])
        if 431 in expect or 404 in expect:
            return expect
        return {401} if op.auth in ("missing", "wrong") else expect - {401}
    if op.auth in ("missing", "wrong"):
        return {401}
    if op.invalid:
        return {400}
    if op.kind == "put" and model.queues[op.sink].ended:
        return {409}
    return None


def wants_protobuf(op: Op) -> bool:
    """The server reads the first Accept header."""
    accept = next((v for k, v in op.headers if k.lower() == b"accept"), b"")
    return b"application/vnd.google.protobuf" in accept


def check_and_apply(op: Op, a: Answer, model: Model, service: str) -> None:
    q = model.queues[op.sink]
    refused = rejection(op, model)
    if refused is not None:
        assert a.status in refused, (op, a)
        return
    if op.kind == "put":
        assert a.status == 200, (op, a)
        assert a.body == str(q.next_index).encode(), (a.body, q.next_index, op)
        assert a.headers.get("x-eas-queueservice-request-id")
        q.entries[q.next_index] = Stored(op.body, dict(op.info["tags"]), op.info["priority"])
        q.next_index += 1
    elif op.kind in ("indexes", "commit"):
        assert (a.status, a.body) == (200, b"OK"), (op, a)
        q.remove(int(x) for x in dict(op.params)["_indexes_"].replace(" ", "").split(",") if x)
    elif op.kind == "index":
        assert (a.status, a.body) == (200, b"OK"), (op, a)
        q.remove([int(dict(op.params)["_index_"])])
    elif op.kind == "trunc":
        assert (a.status, a.body) == (200, b"OK"), (op, a)
        q.remove([i for i in list(q.entries) if i < int(dict(op.params)["_index_"])])
    elif op.kind == "negative":
        assert (a.status, a.body) == (200, b"OK"), (op, a)
    elif op.kind == "end":
        assert (a.status, a.body) == (200, b"OK"), (op, a)
        q.ended = True
        if op.info["force"]:
            q.entries.clear()
    elif op.kind == "get":
        info = op.info
        start = q.next_index if info["start"] == -1 else info["start"]
        want = q.matching(start, info["tags"])[: 1 if info["raw"] else info["length"]]
        if not want:
            assert a.status == 204, (op, a, want)
            return
        assert a.status == 200, (op, a)
        if info["raw"]:
            assert a.body == q.entries[want[0]].data
        elif wants_protobuf(op):
            frames = protobuf.decode_frame_list(a.body)
            assert [(f.index, f.data) for f in frames] == [(i, q.entries[i].data) for i in want]
        else:
            doc = json.loads(a.body)
            assert [(d["index"], base64.b64decode(d["data"])) for d in doc] == [(i, q.entries[i].data) for i in want]
        if info["auto_delete"]:
            q.remove(want)
    elif op.kind == "attrs":
        assert a.status == 200, (op, a)
        attrs = protobuf.decode_attributes(a.body) if wants_protobuf(op) else json.loads(a.body)
        live = q.live()
        assert attrs["stream.length"] == str(len(live))
        assert attrs["stream.firstEntry"] == str(live[0] if live else 0)
        assert attrs["stream.lastEntry"] == str(live[-1] if live else 0)
        assert attrs["meta.state"] == ("End" if q.ended else "Normal")
    elif op.kind == "count":
        assert a.status == 200, (op, a)
        assert a.body == str(len(q.matching(0, op.info["tags"], op.info["priority"]))).encode(), (op, a)
    elif op.kind == "search":
        assert a.status == 200, (op, a)
        index = op.info["index"]
        if index not in q.entries:
            assert json.loads(a.body) == {}
        else:
            order = q.dispatch_order()
            assert json.loads(a.body) == {"IsPending": False, "WaitCount": order.index(index)}
    elif op.kind == "watch":
        assert a.status == 200 and not a.complete, (op, a)
    elif op.kind == "elsewhere":
        pass
    else:
        raise AssertionError(op.kind)


async def run_ops(srv, ops, model: Model, service: str) -> None:
    """Send the operations (groups of them pipelined on one connection) and check every answer."""
    for group in ops:
        if isinstance(group, tuple):   # broken framing: any well-formed answer or a close
            _, name, data = group
            raw = await exchange(srv.listener, data)
            for a in parse_answers(raw, [b"GET"] * 4):
                check_answer(a)
            continue
        data, methods = b"", []
        for op in group:
            if op.kind == "elsewhere":
                data += render(op.method, op.info["path"], op.params, op.headers, op.body, op.auth,
                               raw_target=op.info["path"] + ("?" + urllib.parse.urlencode(op.params) if op.params else ""))
            else:
                data += op.render(service)
            methods.append(op.method)
        raw = await exchange(srv.listener, data)
        answers = parse_answers(raw, methods)
        assert answers or len(group) == 0, (group, raw[:200])
        for op, a in zip(group, answers):
            check_answer(a, op.method)
            check_and_apply(op, a, model, service)
        # a request the server did not answer was not executed: the connection closed after an
        # edge error (413/431/400), which must be the last answer
        if len(answers) < len(group):
            last = answers[-1]
            assert last.status in (400, 408, 413, 431) or not last.complete or last.headers.get("connection") == "close", \
                (group, answers)


async def check_state(srv, model: Model, service: str) -> None:
    """The queues hold exactly what the model says (a non-deleting full listing, and attributes)."""
    for sink in (False, True):
        q = model.queues[sink]
        op = Op("get", b"GET", sink=sink, params=[("_raw_", "false"), ("_auto_delete_", "false"),
                                                  ("_length_", "1000")],
                info={"start": 0, "length": 1000, "raw": False, "auto_delete": False, "tags": {}, "protobuf": False})
        [a] = parse_answers(await exchange(srv.listener, op.render(service)), [b"GET"])
        check_and_apply(op, a, model, service)
        op = Op("attrs", b"GET", sink=sink, params=[("_attrs_", "true")], info={"protobuf": False})
        [a] = parse_answers(await exchange(srv.listener, op.render(service)), [b"GET"])
        check_and_apply(op, a, model, service)
        assert len(q.entries) == len(q.live())
