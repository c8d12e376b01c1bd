"""Hypothesis strategies for the HTTP fuzz tests: valid queue operations decorated with noise
(unknown control parameters, unicode and empty tags, identity/priority/Accept/garbage headers), the
same operations with one invalid parameter, wrong tokens, garbage methods and paths, oversized bodies
and headers, and broken framing (`FRAMING`: bad chunked encoding, mismatched Content-Length, NUL
bytes, bare LF, overlong request lines), grouped into sequences for one service."""

from __future__ import annotations

import os
import urllib.parse

from hypothesis import strategies as st

from .fuzz_model import Op
from .fuzz_wire import MAX_HEADER, MAX_PAYLOAD, render

FILTER_KEYS = ["k", "lang", "ü"]          # tag keys that gets/counts filter on
VALID_BOOL = ["true", "false", "1", "0", "TRUE", "False"]
BOOL = {"true": True, "false": False, "1": True, "0": False}
BAD_BOOL = ["yes", "2", "", "tru", "on"]
BAD_INT = ["x", "1.5", "", "0x10", "1e3", "--1", "18446744073709551616"]
SAFE_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
SHORT_TIMEOUTS = ["", "0", "0s", "10ms", "0.01", "1ms"]
BAD_TIMEOUTS = ["-1", "abc", "1x", "5 s", "-2s"]


unknown_control = st.from_regex(r"\A_[a-z]{1,8}_\Z").filter(lambda n: n not in {
    "_index_", "_indexes_", "_length_", "_timeout_", "_auto_delete_", "_raw_", "_attrs_", "_search_",
    "_count_", "_watch_", "_window_", "_auto_commit_", "_index_only_", "_priority_", "_eos_",
    "_force_", "_trunc_", "_negative_", "_code_", "_reason_"})
noise_params = st.lists(st.tuples(unknown_control, SAFE_TEXT), max_size=2)
header_name = st.from_regex(r"\AX-[A-Za-z0-9-]{1,16}\Z")
header_value = st.binary(max_size=40).map(lambda b: bytes(c for c in b if 0x20 <= c < 0x7f or c >= 0x80).strip())
noise_headers = st.lists(st.one_of(
    st.tuples(header_name.map(str.encode), header_value),
    st.sampled_from([(b"X-EAS-QueueService-Uid", b"u1"), (b"X-EAS-QueueService-Redis-Gid", b"g"),
                     (b"Accept", b"*/*"), (b"User-Agent", b"fuzz/1.0"), (b"Accept-Encoding", b"gzip"),
                     (b"X-EAS-QueueService-Access-Rear", b"true"), (b"Connection", b"keep-alive"),
                     (b"Cookie", b"a=b"), (b"Content-Type", "text/plain; charset=ü".encode())])),
    max_size=3)
auth = st.sampled_from(["ok"] * 12 + ["bearer", "missing", "wrong"])
indexes_value = st.lists(st.integers(0, 40), min_size=1, max_size=5).map(lambda xs: ",".join(map(str, xs)))


@st.composite
def put_op(draw):
    sink = draw(st.booleans())
    subpath = "" if sink or not draw(st.booleans()) else "/".join(
        draw(st.lists(st.from_regex(r"\A[a-z0-9_.-]{1,6}\Z").filter(lambda p: p not in (".", "..")), min_size=1, max_size=3)))
    if subpath == "sink" or subpath.split("/")[0] == "sink":
        subpath = "x/" + subpath
    tags = draw(st.dictionaries(st.one_of(st.sampled_from(FILTER_KEYS), SAFE_TEXT.filter(
        lambda k: not (len(k) > 2 and k[0] == "_" and k[-1] == "_") and k not in (
            "requestId", "ts@source", "ts@sink") and not k.startswith("Header:"))),
        SAFE_TEXT, max_size=4))
    params = list(tags.items()) + draw(noise_params)
    headers = draw(noise_headers)
    priority, invalid = 0, False
    how = draw(st.sampled_from(["none", "none", "param", "header", "both", "bad_param", "bad_header"]))
    if how in ("param", "both"):
        priority = draw(st.integers(0, 5))
        params.append(("_priority_", str(priority)))
    if how in ("header", "both"):
        value = draw(st.integers(0, 5))
        headers.append((b"X-EAS-QueueService-Priority", str(value).encode()))
        if how == "header":
            priority = value
    if how == "bad_param":
        params.append(("_priority_", draw(st.sampled_from(BAD_INT + ["-1", "2147483648"]))))
        invalid = True
    if how == "bad_header":
        headers.append((b"X-EAS-QueueService-Priority", draw(st.sampled_from(["x", "-3", "1.0"])).encode()))
        invalid = True
    draw(st.randoms()).shuffle(params)
    big = draw(st.integers(0, 9)) == 0
    body = draw(st.binary(min_size=MAX_PAYLOAD + 1, max_size=MAX_PAYLOAD + 64) if big else st.binary(max_size=200))
    if draw(st.booleans()):
        headers.append((b"Content-Type", draw(st.sampled_from([b"application/json", b"image/png", b"x/y"]))))
    if draw(st.integers(0, 6)) == 0:
        headers.append((b"Expect", b"100-continue"))
    return Op("put", b"POST", sink=sink, subpath=subpath, params=params, headers=headers, body=body,
              auth=draw(auth), invalid=invalid, info={"tags": tags, "priority": priority})


@st.composite
def delete_op(draw):
    kind = draw(st.sampled_from(["indexes", "index", "trunc", "commit", "negative"]))
    sink = draw(st.booleans())
    invalid = draw(st.integers(0, 4)) == 0
    params = draw(noise_params)
    body = b""
    headers = []
    if kind in ("indexes", "commit", "negative"):
        value = draw(st.sampled_from(BAD_INT[:5] + ["-1", "1;2", ","])) if invalid else draw(indexes_value)
        params.append(("_indexes_", value))
        method = b"DELETE" if kind == "indexes" else b"PUT"
        if kind == "negative":
            params.append(("_negative_", "true"))
            code = draw(st.sampled_from(["", "500", "x" * 65])) if invalid else draw(st.sampled_from(["", "500"]))
            body = urllib.parse.urlencode({"_code_": code, "_reason_": draw(SAFE_TEXT)}).encode()
            if code == "x" * 65:   # only the code is wrong
                params[-2] = ("_indexes_", draw(indexes_value))
            headers.append((b"Content-Type", b"application/x-www-form-urlencoded"))
    elif kind == "index":
        method = b"DELETE"
        params.append(("_index_", draw(st.sampled_from(BAD_INT[:5])) if invalid else str(draw(st.integers(0, 40)))))
    else:
        method = b"DELETE"
        if invalid:
            params += draw(st.sampled_from([[("_trunc_", "true")], [("_trunc_", "maybe"), ("_index_", "3")],
                                            [("_trunc_", "1"), ("_index_", "-2")]]))
        else:
            params += [("_trunc_", draw(st.sampled_from(["true", "1", "TRUE"]))),
                       ("_index_", str(draw(st.integers(0, 45))))]
    draw(st.randoms()).shuffle(params)
    return Op(kind, method, sink=sink, params=params, headers=headers + draw(noise_headers), body=body,
              auth=draw(auth), invalid=invalid)


@st.composite
def get_op(draw):
    sink = draw(st.booleans())
    params = draw(noise_params)
    invalid = False
    info = {"start": 0, "length": 1, "raw": True, "auto_delete": True, "tags": {}}

    def maybe(name, valid, bad, key=None, convert=lambda v: v):
        nonlocal invalid
        choice = draw(st.integers(0, 9))
        if choice < 4:
            return
        if choice == 9:
            params.append((name, draw(st.sampled_from(bad))))
            invalid = True
            return
        value = draw(valid)
        params.append((name, value))
        if key:
            info[key] = convert(value)

    maybe("_index_", st.sampled_from(["0", "1", "2", "5", "-1", "30"]), BAD_INT + ["-2"], "start", int)
    maybe("_length_", st.sampled_from(["1", "2", "5", "1000"]), BAD_INT + ["0", "1001"], "length", int)
    maybe("_raw_", st.sampled_from(VALID_BOOL), BAD_BOOL, "raw", lambda v: BOOL[v.lower()])
    maybe("_auto_delete_", st.sampled_from(VALID_BOOL), BAD_BOOL, "auto_delete", lambda v: BOOL[v.lower()])
    maybe("_timeout_", st.sampled_from(SHORT_TIMEOUTS), BAD_TIMEOUTS)
    if draw(st.booleans()):
        info["tags"] = draw(st.dictionaries(st.sampled_from(FILTER_KEYS), SAFE_TEXT, max_size=1))
        params += list(info["tags"].items())
    headers = draw(noise_headers)
    info["protobuf"] = draw(st.integers(0, 3)) == 0
    if info["protobuf"]:
        headers.append((b"Accept", b"application/vnd.google.protobuf"))
    draw(st.randoms()).shuffle(params)
    return Op("get", b"GET", sink=sink, params=params, headers=headers, auth=draw(auth), invalid=invalid, info=info)


@st.composite
def read_op(draw):
    kind = draw(st.sampled_from(["attrs", "count", "search", "watch"]))
    sink = draw(st.booleans())
    params = draw(noise_params)
    invalid = False
    info = {}
    headers = draw(noise_headers)
    if kind == "attrs":
        params.append(("_attrs_", draw(st.sampled_from(["true", "1", "True"]))))
        info["protobuf"] = draw(st.booleans())
        if info["protobuf"]:
            headers.append((b"Accept", b"application/vnd.google.protobuf"))
    elif kind == "count":
        params.append(("_count_", "true"))
        info["tags"] = draw(st.dictionaries(st.sampled_from(FILTER_KEYS), SAFE_TEXT, max_size=1))
        params += list(info["tags"].items())
        info["priority"] = None
        if draw(st.booleans()):
            if draw(st.integers(0, 3)) == 0:
                params.append(("_priority_", draw(st.sampled_from(BAD_INT[:4] + ["-1"]))))
                invalid = True
            else:
                info["priority"] = draw(st.integers(0, 5))
                params.append(("_priority_", str(info["priority"])))
    elif kind == "search":
        params.append(("_search_", "true"))
        if draw(st.integers(0, 4)) == 0:
            params.append(("_index_", draw(st.sampled_from(BAD_INT[:4] + ["-1"]))))
            invalid = True
        else:
            info["index"] = draw(st.integers(0, 30))
            params.append(("_index_", str(info["index"])))
    else:   # the length-delimited HTTP watch (manual commit); our half-close ends it
        params.append(("_watch_", "true"))
        if draw(st.integers(0, 3)) == 0:
            params.append(("_window_", draw(st.sampled_from(BAD_INT[:4] + ["0", "1001"]))))
            invalid = True
        else:
            params.append(("_window_", str(draw(st.integers(1, 5)))))
    return Op(kind, b"GET", sink=sink, params=params, headers=headers, auth=draw(auth), invalid=invalid, info=info)


@st.composite
def end_op(draw):
    params = [("_eos_", "true")] + ([("_force_", "true")] if draw(st.booleans()) else [])
    return Op("end", b"POST", sink=draw(st.booleans()), params=params, auth=draw(auth),
              info={"force": len(params) == 2})


@st.composite
def garbage_op(draw):
    """Requests that must not change the modelled queues: odd methods on them, any method elsewhere,
    huge headers, sub-paths that only POST may use."""
    what = draw(st.sampled_from(["method", "elsewhere", "subpath", "huge_header", "long_path", "bad_header_value"]))
    headers = draw(noise_headers)
    if what == "method":
        method = draw(st.sampled_from([b"PATCH", b"OPTIONS", b"HEAD", b"TRACE", b"get", b"FOO", b"M-SEARCH", b"PROPFIND"]))
        return Op("garbage", method, sink=draw(st.booleans()), params=draw(noise_params), headers=headers,
                  body=draw(st.binary(max_size=20)), auth=draw(auth), info={"expect": {405, 401}})
    if what == "subpath":
        method = draw(st.sampled_from([b"GET", b"PUT", b"DELETE", b"PATCH"]))
        return Op("garbage", method, subpath=draw(st.sampled_from(["a", "a/b", "sink/x", "%2e%2e", "x/../.."])),
                  params=[("_indexes_", "1")], headers=headers, auth=draw(auth), info={"expect": {404}})
    if what == "huge_header":
        headers.append((b"X-Huge", b"h" * draw(st.integers(MAX_HEADER, MAX_HEADER + 5000))))
        return Op("garbage", draw(st.sampled_from([b"GET", b"POST", b"DELETE"])), params=[("_indexes_", "1")],
                  headers=headers, body=b"x", info={"expect": {431}})
    if what == "bad_header_value":
        # obs-text and odd bytes in values are legal HTTP; they must not break anything
        headers.append((b"X-EAS-Odd", bytes(draw(st.lists(st.integers(0x80, 0xff), min_size=1, max_size=8)))))
        return Op("garbage", b"GET", params=[("_attrs_", "true")], headers=headers, info={"expect": {200}})
    if what == "long_path":
        n = draw(st.sampled_from([2000, 9000, MAX_HEADER + 100]))
        return Op("garbage", b"GET", subpath="p" * n, headers=headers,
                  info={"expect": {404, 431}})
    # elsewhere: any method, any path outside our queues (never our service)
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
    path = draw(st.one_of(
        st.sampled_from(["/", "/api", "/api/predict", "/api/predict/", "/api/predict//sink", "/sink",
                         "/healthz/x", "/api/predict/%2e%2e", "/api/predict/./x", "*", "/%00", "/api/%ZZ",
                         "/api/predict/zz%20svc", "/api/predict/zz%F0%9F%92%A5/sink", "//api/predict/zz"]),
        SAFE_TEXT.map(lambda t: "/api/predict/zz" + urllib.parse.quote(t, safe="/%")),
        st.text(st.sampled_from("/%2eAZaz09-_~!$&'()*+,;=:@"), max_size=30).map(lambda t: "/" + t)))
    return Op("elsewhere", method, params=draw(noise_params), headers=headers,
              body=draw(st.binary(max_size=40)), auth=draw(auth), info={"path": path})


FRAMING = [
    # (name, bytes) -- sent to a service the model does not track
    ("bad chunk size", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n"),
    ("chunk missing CRLF", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n"),
    ("chunked, no end", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"),
    ("huge chunk", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\nabc\r\n"),
    ("short body", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                   b"Content-Length: 100\r\n\r\nabc"),
    ("long body", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                  b"Content-Length: 3\r\n\r\nabcGARBAGE\r\n\r\n"),
    ("two lengths", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                    b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"),
    ("length and chunked", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                           b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("bad length", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\nabc"),
    ("negative length", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    ("enormous length", b"POST /api/predict/zzjunk HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                        b"Content-Length: 99999999999999999999999\r\n\r\nabc"),
    ("NUL in header", b"GET /api/predict/zzjunk?_attrs_=true HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n"),
    ("NUL in target", b"GET /api/predict/zz\x00junk HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("bare LF", b"GET /api/predict/zzjunk?_attrs_=true HTTP/1.1\nHost: x\nAuthorization: tok\n\n"),
    ("bare CR", b"GET /api/predict/zzjunk?_attrs_=true HTTP/1.1\rHost: x\r\r"),
    ("overlong request line", b"GET /" + b"a" * (MAX_HEADER + 10) + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("overlong, no end", b"GET /" + b"a" * (MAX_HEADER * 3)),
    ("obs-fold", b"GET /api/predict/zzjunk?_attrs_=true HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n"
                 b"X-Folded: a\r\n b\r\n\r\n"),
    ("no colon", b"GET /healthz HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n"),
    ("space before colon", b"GET /healthz HTTP/1.1\r\nHost : x\r\n\r\n"),
    ("HTTP/2.0", b"GET /healthz HTTP/2.0\r\nHost: x\r\n\r\n"),
    ("HTTP/1.0 no host", b"GET /healthz HTTP/1.0\r\n\r\n"),
    ("HTTP/1.1 no host", b"GET /healthz HTTP/1.1\r\n\r\n"),
    ("lower-case version", b"GET /healthz http/1.1\r\nHost: x\r\n\r\n"),
    ("two spaces", b"GET  /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("TLS hello", bytes.fromhex("16030100a5010000a10303") + os.urandom(40)),
    ("empty", b""),
    ("only CRLF", b"\r\n\r\n\r\n"),
    ("half request line", b"GET /api/pre"),
    ("half headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: "),
    ("websocket upgrade with body", b"GET /api/predict/zzjunk?_watch_=true HTTP/1.1\r\nHost: x\r\n"
                                    b"Authorization: tok\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                    b"Content-Length: 3\r\n\r\nabc"),
    ("websocket upgrade wrong version", b"GET /api/predict/zzjunk?_watch_=true HTTP/1.1\r\nHost: x\r\n"
                                        b"Authorization: tok\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                                        b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: x\r\n\r\n"),
    ("upgrade h2c", b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"),
    ("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"),
    ("absolute form", b"GET http://fuzz/api/predict/zzjunk?_attrs_=true HTTP/1.1\r\nHost: x\r\nAuthorization: tok\r\n\r\n"),
    ("many headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 3000 + b"\r\n"),
    ("pipelined with garbage", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"),
]


@st.composite
def framing_op(draw):
    name, data = draw(st.sampled_from(FRAMING))
    if draw(st.integers(0, 3)) == 0:   # or a random mangling of a valid request
        base = bytearray(render(b"POST", "/api/predict/zzjunk", [("a", "b")], [], b"hello"))
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, len(base)))
            action = draw(st.sampled_from(["insert", "delete", "flip"]))
            if action == "insert":
                base[pos:pos] = draw(st.binary(min_size=1, max_size=4))
            elif action == "delete":
                del base[pos:pos + draw(st.integers(1, 4))]
            elif pos < len(base):
                base[pos] ^= 1 << draw(st.integers(0, 7))
        name, data = "mangled", bytes(base)
    return ("framing", name, data)


any_op = st.one_of(put_op(), put_op(), get_op(), delete_op(), read_op(), garbage_op(), end_op(), framing_op())


services = st.one_of(st.just("fz"), st.sampled_from(["grp.svc", "fz-ü", "a b", "x%y", "中文"]))
op_groups = st.lists(st.one_of(
    any_op.map(lambda op: op if isinstance(op, tuple) else [op]),
    st.lists(st.one_of(put_op(), get_op(), delete_op(), read_op().filter(lambda o: o.kind != "watch")),
             min_size=2, max_size=4)),
    min_size=1, max_size=10)
