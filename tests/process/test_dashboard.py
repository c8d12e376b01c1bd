"""The dashboard of a real `qserve serve` process: its page in headless Chromium (the queue depth, the
consumers and moving rates read from the page's DOM, screenshots on a laptop's and a phone's
screen), `GET /api/dashboard` on both backends with the API's token rule, the page's files, and
the routing of their paths (next to `--root-service`, which takes every other path)."""

from __future__ import annotations

import http.client
import json
import re
import struct
from importlib import resources

import pytest
import trio

from qserve import QueueClient
from qserve.config import Config
from qserve.core import events as ev
from qserve.core.errors import MethodNotAllowed, Unauthorized
from qserve.core.routing import route
from qserve.server.dashboard import FILES

from ..helpers.browser import chromium_path, open_browser
from ..helpers.machine import command_missing
from ..helpers.process import ServerProcess, backend_args

LIMIT = 120.0        # seconds for the browser test, Chromium's start included
TIMEOUT = 10.0
BACKLOG = 25         # entries waiting in the queue nobody consumes
STUCK_WINDOW = 3     # the backlog's one consumer takes this many and never commits
WORKER_WINDOW = 4
ROUNDS = 8           # dashboard updates with puts in between (the chart's history in the screenshot)
LAPTOP = (1280, 900)
PHONE = (390, 844)


def request(srv: ServerProcess, method: str, path: str, token: str | None = None, body: bytes = b""):
    """One HTTP request on a connection of its own: (status, headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=TIMEOUT)
    try:
        conn.request(method, path, body, {"Authorization": token} if token is not None else {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def text_of(queue: str, field: str) -> str:
    """JavaScript: the text of one figure of a queue's card."""
    return f"document.querySelector('[data-queue=\"{queue}\"] [data-field=\"{field}\"]')?.textContent"


def cells_of(queue: str, row: str) -> str:
    """JavaScript: the cells of a row of a queue's tables (``row``: an attribute selector)."""
    return (f"Array.from(document.querySelectorAll('[data-queue=\"{queue}\"] tr[{row}] td'))"
            f".map((td) => td.textContent)")


async def hold(client: QueueClient, holding: trio.Event) -> None:
    """A consumer that takes its window of entries and never commits them."""
    taken = 0
    async with client.watch(window=STUCK_WINDOW) as entries:
        async for _ in entries:
            taken += 1
            if taken == STUCK_WINDOW:
                holding.set()


async def take(client: QueueClient, taken: list[int]) -> None:
    """A consumer that keeps the indexes it gets in ``taken`` (`commit_taken` commits them)."""
    async with client.watch(window=WORKER_WINDOW) as entries:
        async for entry in entries:
            taken.append(entry.index)


async def commit_taken(client: QueueClient, taken: list[int]) -> None:
    """Commit what the consumer took so far (which frees its window for more)."""
    done = taken[:]
    del taken[:len(done)]
    if done:
        await client.commit(done)


async def test_the_dashboard_in_headless_chromium(tmp_path):
    if chromium_path() is None:
        command_missing("chromium is not installed: the dashboard's browser test needs it (apt-get install chromium)")
    srv = ServerProcess(tmp_path / "data").start()
    try:
        with trio.fail_after(LIMIT):
            await drive_the_dashboard(srv, tmp_path)
    finally:
        assert srv.stop() == 0


async def drive_the_dashboard(srv: ServerProcess, tmp_path) -> None:
    base = srv.url + "/api/predict/"
    backlog = QueueClient(base + "backlog", token=srv.token)
    orders = QueueClient(base + "orders", token=srv.token)
    stuck = QueueClient(base + "backlog", token=srv.token, group="batch", user="stuck-1")
    workers = [QueueClient(base + "orders", token=srv.token, group="gpu", user=f"worker-{i}") for i in (1, 2)]
    for i in range(BACKLOG):
        await backlog.put(f"job {i}".encode())
    for i in range(8):
        await orders.put(f"order {i}".encode())
    async with trio.open_nursery() as consumers:
        holding = trio.Event()
        consumers.start_soon(hold, stuck, holding)
        taken: list[list[int]] = [[], []]
        for worker, indexes in zip(workers, taken):
            consumers.start_soon(take, worker, indexes)
        await holding.wait()
        async with open_browser(tmp_path / "chromium", width=LAPTOP[0], height=LAPTOP[1]) as page:
            await page.goto(srv.url + "/dashboard")
            # the token: asked once; a wrong one is refused in the form
            await page.wait_for("!document.getElementById('login').hidden")
            await page.type_into("#token", "wrong")
            await page.click("#login button")
            assert await page.wait_for("document.getElementById('login-error').textContent") == \
                "The server refused that token."
            await page.type_into("#token", srv.token)
            await page.click("#login button")
            await page.wait_for("document.body.dataset.updates >= 1")
            assert await page.evaluate("document.getElementById('login').hidden")

            # the depth of the queue nobody consumes, and its stuck consumer
            assert await page.evaluate(text_of("backlog/input", "length")) == str(BACKLOG)
            stuck_row = cells_of("backlog/input", 'data-consumer="batch.stuck-1"')
            row = await page.wait_for(f"{stuck_row}.filter((cell, i) => i !== 4).join('|')")   # all but idle
            assert row == f"batch.stuck-1|Running|{STUCK_WINDOW}|{STUCK_WINDOW}|manual"
            group = await page.evaluate(cells_of("backlog/input", 'data-group="batch"'))
            assert group[:3] == ["batch", "1", str(STUCK_WINDOW)]
            # both workers of the orders queue
            await page.wait_for("document.querySelectorAll('[data-queue=\"orders/input\"] tr[data-consumer]')"
                                ".length === 2")
            for i in (1, 2):
                cells = await page.evaluate(cells_of("orders/input", f'data-consumer="gpu.worker-{i}"'))
                assert cells[0] == f"gpu.worker-{i}" and cells[2] == str(WORKER_WINDOW) and cells[5] == "manual"

            # rates: between two updates of the page the workers commit what they hold (which lets
            # up to two windows more out) and a different number of entries is put each time
            seen_in, seen_out = [], []
            updates = int(await page.evaluate("document.body.dataset.updates"))
            for round_ in range(ROUNDS):
                for worker, indexes in zip(workers, taken):
                    await commit_taken(worker, indexes)
                for i in range(4 * (round_ % 3 + 1)):
                    await orders.put(f"round {round_} entry {i}".encode())
                updates = await page.wait_for(f"Number(document.body.dataset.updates) > {updates} "
                                              f"&& Number(document.body.dataset.updates)")
                seen_in.append(await page.evaluate(text_of("orders/input", "in-rate")))
                seen_out.append(await page.evaluate(text_of("orders/input", "out-rate")))
            moving = [float(r) for r in seen_in[1:]]   # the first one may span the login
            assert all(r > 0 for r in moving), seen_in
            assert len(set(moving)) >= 2, seen_in
            assert any(re.fullmatch(r"[0-9.]+", r) and float(r) > 0 for r in seen_out), seen_out
            assert await page.evaluate(text_of("backlog/input", "in-rate")) == "0.0"

            # the server's figures: three watchers, on three WebSockets
            assert await page.evaluate("document.querySelector('[data-field=\"watch-sessions\"]').textContent") == "3"
            assert await page.evaluate("document.querySelector('[data-field=\"websockets\"]').textContent") == "3"
            assert await page.evaluate("document.querySelector('[data-field=\"status\"]').textContent") == "ready"
            assert await page.evaluate("document.getElementById('no-dlq').hidden") is False
            assert await page.evaluate("document.querySelectorAll('.queue canvas').length") >= 2

            laptop = await page.screenshot(tmp_path / "dashboard.png")
            assert png_size(laptop)[0] == LAPTOP[0]
            # a phone: one column, nothing wider than the screen
            await page.set_viewport(*PHONE, mobile=True)
            await page.wait_for(f"Number(document.body.dataset.updates) > {updates}")
            phone = await page.screenshot(tmp_path / "dashboard-phone.png")
            assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE[0]
            assert png_size(phone)[0] == PHONE[0]
            print(f"screenshots: {laptop} {phone}")

            # the token is kept for the tab: a reload does not ask again
            await page.goto(srv.url + "/dashboard")
            await page.wait_for("document.body.dataset.updates >= 1")
            assert await page.evaluate("document.getElementById('login').hidden")
            # nothing failed in the page but the refusals of the token (the browser logs a 401)
            refused = re.compile(r"status of 401 \(Unauthorized\) \S+/api/dashboard")
            assert [error for error in page.collect_errors() if not refused.search(error)] == []
        consumers.cancel_scope.cancel()
    for client in (backlog, orders, stuck, *workers):
        await client.aclose()


async def test_dashboard_data_on_both_backends(tmp_path, backend_url, service):
    srv = ServerProcess(tmp_path / "data", *backend_args(backend_url)).start()
    try:
        with trio.fail_after(60):
            async with QueueClient(f"{srv.url}/api/predict/{service}", token=srv.token, group="g", user="u") as q:
                for i in range(3):
                    await q.put(f"e{i}".encode())
                async with q.watch(window=2) as entries:
                    async for entry in entries:
                        if entry.index == 2:
                            break
                    assert (await trio.to_thread.run_sync(request, srv, "GET", "/api/dashboard"))[0] == 401
                    assert (await trio.to_thread.run_sync(request, srv, "GET", "/api/dashboard", "wrong"))[0] == 401
                    status, headers, body = await trio.to_thread.run_sync(request, srv, "GET", "/api/dashboard",
                                                                          srv.token)
        assert status == 200 and headers["Content-Type"] == "application/json"
        doc = json.loads(body)
        [queue] = [q for q in doc["queues"] if q["service"] == service and q["queue"] == "input"]
        assert (queue["length"], queue["first_index"], queue["last_index"]) == (3, 1, 3)
        assert queue["path"] == f"/api/predict/{service}"
        assert queue["counters"]["puts"] == 3 and queue["counters"]["deliveries"] == 2
        assert queue["pending"] == 2 and queue["consumers"] == 1
        assert [(c["id"], c["pending"], c["window"], c["auto_commit"]) for c in queue["consumer_list"]] == \
            [("g.u", 2, 2, False)]
        assert [(g["name"], g["pending"]) for g in queue["groups"]] == [("g", 2)]
        server = doc["server"]
        assert server["backend"] == ("redis" if backend_url else "local") and server["ready"] is True
        assert server["uptime"] > 0 and server["put_count"] >= 3 and server["requests"] >= 3
        assert server["rss_bytes"] > 0 and server["cpu_seconds"] > 0 and server["open_fds"] > 0
        assert doc["time"] > 1.7e9
        status, headers, _ = request(srv, "POST", "/api/dashboard", srv.token)
        assert status == 405 and headers["Allow"] == "GET"
    finally:
        assert srv.stop() == 0


def test_the_page_files_need_no_token_and_load_nothing_from_elsewhere(tmp_path):
    srv = ServerProcess(tmp_path / "data").start()
    try:
        folder = resources.files("qserve") / "dashboard"
        for name, content_type in FILES.items():
            status, headers, body = request(srv, "GET", f"/dashboard/{name}")
            assert (status, headers["Content-Type"]) == (200, content_type), name
            assert body == folder.joinpath(name).read_bytes()
            assert headers["Content-Security-Policy"].startswith("default-src 'self'")
        for path in ("/dashboard", "/dashboard/"):
            assert request(srv, "GET", path)[2] == folder.joinpath("index.html").read_bytes()
        status, _, body = request(srv, "GET", "/dashboard/nothing.js")
        assert (status, body) == (404, b"no dashboard file nothing.js\n")
        assert request(srv, "GET", "/dashboard/%2e%2e/pyproject.toml")[0] == 404
        page = folder.joinpath("index.html").read_text()
        links = re.findall(r'(?:src|href)="([^"]*)"', page)
        assert links and all(link.startswith("/dashboard/") for link in links), links
        assert "://" not in folder.joinpath("app.js").read_text()
        assert "MIT License" in folder.joinpath("uplot/LICENSE").read_text()
    finally:
        assert srv.stop() == 0


def test_a_service_token_sees_only_its_services(tmp_path):
    config = tmp_path / "qserve.toml"
    config.write_text('[tokens]\n"alpha" = "token-a"\n"beta" = "token-b"\n')
    srv = ServerProcess(tmp_path / "data", "--config", str(config), token=None).start()
    try:
        for service, token in (("alpha", "token-a"), ("beta", "token-b")):
            assert request(srv, "POST", f"/api/predict/{service}", token, b"x")[0] == 200
        for token, service in (("token-a", "alpha"), ("token-b", "beta")):
            status, _, body = request(srv, "GET", "/api/dashboard", token)
            assert status == 200
            assert {q["service"] for q in json.loads(body)["queues"]} == {service}
        assert request(srv, "GET", "/api/dashboard")[0] == 401
        assert request(srv, "GET", "/dashboard")[0] == 200
    finally:
        assert srv.stop() == 0


def test_the_dashboard_paths_come_before_the_root_service():
    config = Config(token="tok", root_service="root")

    def op(method: str, path: str, token: str | None = "tok"):
        headers = {"authorization": token} if token is not None else {}
        return route(method, path, [], headers, b"x", config, anonymous_user=lambda: "anon-1")

    assert op("GET", "/dashboard", token=None) == ev.DashboardFile("index.html")
    assert op("GET", "/dashboard/", token=None) == ev.DashboardFile("index.html")
    assert op("GET", "/dashboard/uplot/uPlot.min.css", token=None) == ev.DashboardFile("uplot/uPlot.min.css")
    assert op("GET", "/api/dashboard") == ev.DashboardData("tok")
    assert op("GET", "/api/dashboard", token="Bearer tok") == ev.DashboardData("tok")
    with pytest.raises(Unauthorized):
        op("GET", "/api/dashboard", token=None)
    with pytest.raises(MethodNotAllowed):
        op("DELETE", "/api/dashboard")
    put = op("POST", "/dashboard")   # a put to the root service's sub-path, as before the dashboard
    assert isinstance(put, ev.Put) and dict(put.tags)["_path_"] == "dashboard"
