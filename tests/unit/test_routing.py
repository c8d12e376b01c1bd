"""Routing: requests to operations, and the status each kind of bad request gets (no server)."""

import pytest

from qserve.core import events as ev
from qserve.config import Config
from qserve.core.errors import BadRequest, MethodNotAllowed, NotFound, Unauthorized
from qserve.core.routing import PRODUCER, PutRoutes, header_tags, route

CFG = Config(token="tok")


def r(method, path, query=(), headers=None, body=b"", config=CFG, upgrade=False):
    h = {"authorization": "tok"}
    h.update(headers or {})
    return route(method, path, list(query), h, body, config, anonymous_user=lambda: "anon-1", upgrade=upgrade)


def test_put_to_input_and_sink():
    op = r("POST", "/api/predict/grp.svc", [("k", "v")], body=b"x")
    assert isinstance(op, ev.Put) and op.queue == ev.QueueRef("grp.svc") and dict(op.tags) == {"k": "v"}
    op = r("POST", "/api/predict/grp.svc/sink", body=b"x")
    assert op.queue == ev.QueueRef("grp.svc", sink=True) and op.queue.name == "grp.svc/sink"


def test_custom_subpath_put_is_tagged():
    op = r("POST", "/api/predict/svc/a/b")
    assert isinstance(op, ev.Put) and op.queue == ev.QueueRef("svc") and dict(op.tags)["_path_"] == "a/b"
    with pytest.raises(NotFound):
        r("GET", "/api/predict/svc/a/b")


def test_root_mode():
    cfg = Config(root_service="one")
    assert r("POST", "/", config=cfg).queue == ev.QueueRef("one")
    assert r("GET", "/sink", config=cfg).queue == ev.QueueRef("one", sink=True)
    assert dict(r("POST", "/x/y", config=cfg).tags)["_path_"] == "x/y"
    assert r("GET", "/api/predict/other", config=cfg).queue == ev.QueueRef("other")


def test_unknown_paths_and_declared_queues():
    with pytest.raises(NotFound):
        r("GET", "/elsewhere")
    with pytest.raises(NotFound):
        r("GET", "/api/predict/")
    cfg = Config(queues=("a",))
    assert r("GET", "/api/predict/a", config=cfg).queue.service == "a"
    with pytest.raises(NotFound):
        r("GET", "/api/predict/b", config=cfg)


def test_token():
    with pytest.raises(Unauthorized):
        route("GET", "/api/predict/s", [], {}, b"", CFG, anonymous_user=lambda: "a")
    with pytest.raises(Unauthorized):
        r("GET", "/api/predict/s", headers={"authorization": "nope"})
    assert isinstance(r("GET", "/api/predict/s", headers={"authorization": "Bearer tok"}), ev.Get)
    per = Config(token="all", tokens={"s": "mine"})
    with pytest.raises(Unauthorized):
        r("GET", "/api/predict/s", headers={"authorization": "all"}, config=per)
    assert isinstance(r("GET", "/api/predict/t", headers={"authorization": "all"}, config=per), ev.Get)


def test_method_not_allowed():
    with pytest.raises(MethodNotAllowed) as info:
        r("PATCH", "/api/predict/s")
    assert ("Allow", "GET, POST, PUT, DELETE") in info.value.headers


def test_identity_headers_both_pairs():
    op = r("GET", "/api/predict/s", headers={"x-eas-queueservice-uid": "u", "x-eas-queueservice-gid": "g"})
    assert op.identity.consumer_id == "g.u"
    op = r("GET", "/api/predict/s", headers={"x-eas-queueservice-redis-uid": "u2",
                                               "x-eas-queueservice-redis-gid": "g2"})
    assert op.identity.consumer_id == "g2.u2"
    op = r("GET", "/api/predict/s")
    assert op.identity.consumer_id == "default_group.anon-1" and op.identity.anonymous


def test_get_defaults_and_parameters():
    op = r("GET", "/api/predict/s")
    assert (op.start, op.length, op.timeout, op.auto_delete, op.raw, op.protobuf) == (0, 1, 0.0, True, True, False)
    op = r("GET", "/api/predict/s", [("_index_", "3"), ("_length_", "2"), ("_timeout_", "2s"),
                                     ("_raw_", "false"), ("_auto_delete_", "FALSE"), ("requestId", "rid"),
                                     ("a", "b"), ("_unknown_", "x")],
           headers={"accept": "application/vnd.google.protobuf"})
    assert (op.start, op.length, op.timeout, op.auto_delete, op.raw, op.protobuf) == (3, 2, 2.0, False, False, True)
    assert dict(op.tags) == {"requestId": "rid", "a": "b"}
    assert r("GET", "/api/predict/s", [("_timeout_", "")]).timeout == 0
    assert r("GET", "/api/predict/s", [("_timeout_", "5")]).timeout == 5


@pytest.mark.parametrize("query", [
    [("_length_", "0")], [("_length_", "x")], [("_index_", "-2")], [("_timeout_", "-1s")],
    [("_timeout_", "soon")], [("_raw_", "maybe")], [("_auto_delete_", "yes please")],
])
def test_bad_get_parameters(query):
    with pytest.raises(BadRequest):
        r("GET", "/api/predict/s", query)


def test_other_get_operations():
    assert isinstance(r("GET", "/api/predict/s", [("_attrs_", "true")]), ev.Attributes)
    assert r("GET", "/api/predict/s", [("_search_", "true"), ("_index_", "4")]).index == 4
    op = r("GET", "/api/predict/s", [("_count_", "true"), ("_priority_", "1"), ("t", "v")])
    assert isinstance(op, ev.Count) and op.priority == 1 and dict(op.tags) == {"t": "v"}
    op = r("GET", "/api/predict/s", [("_watch_", "true"), ("_index_", "0"), ("_window_", "5"),
                                     ("_index_only_", "true"), ("_auto_commit_", "1"), ("t", "1")], upgrade=True)
    assert isinstance(op, ev.Watch) and (op.window, op.index_only, op.auto_commit, op.websocket) == (5, True, True, True)
    assert r("GET", "/api/predict/s", [("_watch_", "true")]).window == 10
    with pytest.raises(BadRequest):
        r("GET", "/api/predict/s", [("_watch_", "true"), ("_window_", "0")])


def test_put_priority_from_param_or_header_and_header_tags():
    assert r("POST", "/api/predict/s", [("_priority_", "2")]).priority == 2
    assert r("POST", "/api/predict/s", headers={"x-eas-queueservice-priority": "3"}).priority == 3
    with pytest.raises(BadRequest):
        r("POST", "/api/predict/s", [("_priority_", "-1")])
    op = r("POST", "/api/predict/s", headers={"content-type": "text/plain", "x-eas-trace": "t",
                                               "x-eas-queueservice-uid": "u"})
    tags = dict(op.tags)
    assert tags["Header:Content-Type"] == "text/plain" and tags["Header:X-Eas-Trace"] == "t"
    assert not any("Uid" in k or "Authorization" in k for k in tags)


def test_header_tags_never_auth_or_identity():
    assert header_tags({"authorization": "x", "x-eas-queueservice-redis-gid": "g"}) == []


def test_end_delete_truncate_commit_negative():
    assert r("POST", "/api/predict/s", [("_eos_", "true"), ("_force_", "true")]).force
    assert r("DELETE", "/api/predict/s", [("_indexes_", "1,2")]).indexes == (1, 2)
    assert r("DELETE", "/api/predict/s", [("_index_", "7")]).indexes == (7,)
    assert r("DELETE", "/api/predict/s", [("_index_", "7"), ("_trunc_", "true")]).below == 7
    assert isinstance(r("PUT", "/api/predict/s", [("_indexes_", "3")]), ev.Commit)
    op = r("PUT", "/api/predict/s", [("_indexes_", "3"), ("_negative_", "true")],
           body=b"_code_=Shutdown&_reason_=bye+now")
    assert isinstance(op, ev.Negative) and (op.code, op.reason) == ("Shutdown", "bye now")
    for method, query in [("DELETE", []), ("PUT", []), ("DELETE", [("_indexes_", "a,b")]),
                          ("DELETE", [("_trunc_", "true")])]:
        with pytest.raises(BadRequest):
            r(method, "/api/predict/s", query)


@pytest.mark.parametrize("method, query, body, reason", [
    ("DELETE", [("_trunc_", "true")], b"", "_index_: required with _trunc_"),
    ("DELETE", [], b"", "_indexes_: required (or _index_)"),
    ("PUT", [], b"", "_indexes_: required"),
    ("PUT", [("_indexes_", "1"), ("_negative_", "true")], b"_code_=" + b"x" * 65,
     "_code_/_reason_: too long (64 / 1024 characters at most)"),
    ("GET", [("_length_", "0")], b"", "_length_: expected an integer between 1 and 1000, got '0'"),
    ("GET", [("_timeout_", "soon")], b"", "_timeout_: expected "),
])
def test_a_bad_or_missing_parameter_is_one_400_naming_it(method, query, body, reason):
    """Every parameter problem is a `wire.params.ParamError`, made the 400 by `route` alone: the
    reason starts with the parameter's wire name."""
    with pytest.raises(BadRequest) as bad:
        r(method, "/api/predict/s", query, body=body)
    assert bad.value.reason.startswith(reason) and bad.value.http_status == 400


def test_the_path_memo_is_bounded_and_skips_long_paths():
    """Routing memoizes short paths only (at most 1024 of them): a client naming ever new long
    paths must not make the server hold them; a long path still routes the same."""
    from qserve.core import routing
    routing._queue_at.cache_clear()
    long_path = "/api/predict/svc/" + "x" * routing._MEMO_PATH_MAX
    op = r("POST", long_path)
    assert op.queue == ev.QueueRef("svc") and dict(op.tags)["_path_"] == "x" * routing._MEMO_PATH_MAX
    assert routing._queue_at.cache_info().currsize == 0
    for i in range(1100):
        assert r("POST", f"/api/predict/svc/{i}").queue == ev.QueueRef("svc")
    info = routing._queue_at.cache_info()
    assert info.currsize == info.maxsize == 1024


def test_the_header_name_memo_skips_long_names():
    from qserve.core import routing
    routing._canonical_memo.cache_clear()
    long_name = "x-eas-" + "ab-" * 30
    assert routing.canonical_header(long_name) == "X-Eas-" + "Ab-" * 30
    assert routing.canonical_header("x-eas-foo") == "X-Eas-Foo"
    assert routing._canonical_memo.cache_info().currsize == 1


def _memo_route(routes, method, target, headers, body, anonymous_user):
    path, _, query = target.partition("?")
    pairs = [tuple(p.split("=", 1)) for p in query.split("&")] if query else []
    return routes.route(method, target, path, pairs, headers, body, anonymous_user=anonymous_user)


_PUTS = [   # (target, headers): what a put's route depends on, each varied
    ("/api/predict/svc", (("host", "h"), ("content-length", "3"), ("authorization", "tok"))),
    ("/api/predict/svc/sink?k=v&_priority_=4", (("content-length", "3"), ("authorization", "Bearer tok"),
                                                ("x-eas-queueservice-uid", "u"), ("x-eas-trace", "t1"))),
    ("/api/predict/svc/a/b", (("authorization", "tok"), ("content-type", "text/plain"),
                              ("x-eas-queueservice-priority", "7"), ("x-eas-queueservice-gid", "g"))),
    ("/api/predict/svc?k=v", (("authorization", "tok"), ("x-eas-trace", "first"), ("x-eas-trace", "second"))),
]


@pytest.mark.parametrize("target, headers", _PUTS)
def test_a_memoized_put_route_is_the_route_of_the_same_request(target, headers):
    routes = PutRoutes(CFG)
    drawn = []
    anonymous = lambda: drawn.append(1) or f"anon-{len(drawn)}"   # noqa: E731
    path, _, query = target.partition("?")
    pairs = [tuple(p.split("=", 1)) for p in query.split("&")] if query else []
    for body in (b"one", b"second body"):   # a miss, then a hit with another body and length
        sized = tuple((k, str(len(body)) if k == "content-length" else v) for k, v in headers)
        op = _memo_route(routes, "POST", target, sized, body, anonymous)
        expected = route("POST", path, pairs, dict(reversed(sized)), body, CFG, anonymous_user=anonymous)
        assert type(op) is ev.Put and op == expected and op.data == body
    assert len(routes._puts) == 1 and not drawn   # a put draws no anonymous consumer id


def test_an_anonymous_post_speaks_as_the_producer_and_a_get_gets_a_fresh_id():
    routes = PutRoutes(CFG)
    counter = iter(range(1, 100))
    anonymous = lambda: f"anon-{next(counter)}"   # noqa: E731
    op = _memo_route(routes, "POST", "/api/predict/svc", (("authorization", "tok"),), b"x", anonymous)
    assert op.identity == ev.Identity("default_group", PRODUCER, anonymous=True)
    first = _memo_route(routes, "GET", "/api/predict/svc", (("authorization", "tok"),), b"", anonymous)
    second = _memo_route(routes, "GET", "/api/predict/svc", (("authorization", "tok"),), b"", anonymous)
    assert (first.identity.user, second.identity.user) == ("anon-1", "anon-2") and len(routes._puts) == 1


def test_the_put_memo_keeps_no_error_and_no_other_post():
    routes = PutRoutes(CFG)
    for _ in range(2):   # refused each time, the same way
        with pytest.raises(Unauthorized):
            _memo_route(routes, "POST", "/api/predict/svc", (("authorization", "wrong"),), b"x", str)
        with pytest.raises(BadRequest):
            _memo_route(routes, "POST", "/api/predict/svc?_priority_=-1", (("authorization", "tok"),), b"x", str)
        op = _memo_route(routes, "POST", "/api/predict/svc?_eos_=true", (("authorization", "tok"),), b"", str)
        assert type(op) is ev.End
    assert not routes._puts


def test_the_put_memo_is_bounded_and_drops_its_oldest_first():
    routes = PutRoutes(CFG)
    for n in range(PutRoutes.SIZE + 5):
        _memo_route(routes, "POST", f"/api/predict/svc?n={n}", (("authorization", "tok"),), b"x", str)
    assert len(routes._puts) == PutRoutes.SIZE
    kept = sorted(int(target.partition("=")[2]) for target, _ in routes._puts)
    assert kept == list(range(5, PutRoutes.SIZE + 5))


def test_the_put_memo_tells_apart_requests_that_differ_only_in_a_header():
    routes = PutRoutes(CFG)
    base = (("authorization", "tok"), ("content-length", "1"))
    variants = [base, (*base, ("x-eas-queueservice-uid", "u")), (*base, ("x-eas-queueservice-priority", "3")),
                (*base, ("x-eas-trace", "t")), (("authorization", "wrong"), ("content-length", "1"))]
    seen = []
    for _ in range(2):
        for headers in variants[:-1]:
            op = _memo_route(routes, "POST", "/api/predict/svc", headers, b"x", str)
            seen.append((op.identity, op.priority, op.tags))
        with pytest.raises(Unauthorized):   # a wrong token is refused even after the right one's put
            _memo_route(routes, "POST", "/api/predict/svc", variants[-1], b"x", str)
    assert len(set(seen)) == 4 and seen[:4] == seen[4:] and len(routes._puts) == 4
