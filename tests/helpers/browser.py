"""Headless Chromium driven over the Chrome DevTools Protocol, for tests of the pages qserve serves.

Strategy: Debian's ``chromium`` starts headless with the flags this machine's closed network needs
(no background networking, component updates, sync or QUIC: each would try to reach the internet),
a fresh ``--user-data-dir`` under the test's tmp dir and ``--remote-debugging-port=0``; it prints the
browser's DevTools WebSocket address on stderr, and the test speaks CDP to it over trio-websocket
(a dependency of qserve itself: no browser-driver package, nothing downloaded). One connection, one
page attached in flat mode (its commands carry the session id). `Page.wait_for` waits inside the
page for a JavaScript condition, re-checked on every DOM change (no polling from here). Errors the
page reports (uncaught exceptions, console errors, failed loads, Content-Security-Policy refusals)
are collected in `Page.errors`.

Chromium runs in a session of its own, so its helpers (renderer, GPU, zygote) share its process
group: `open_browser` closes it over CDP and then kills that group by the pid it started, so nothing
outlives the test.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio_websocket

__all__ = ["chromium_path", "open_browser", "Page", "BrowserError", "FLAGS"]

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0"]
START_TIMEOUT = 30.0    # seconds for Chromium to print its DevTools address
STOP_TIMEOUT = 5.0      # seconds for Chromium to exit once asked, before its group is killed

_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class BrowserError(Exception):
    """Chromium refused a command, failed to start, or the page's JavaScript threw."""


def chromium_path() -> str | None:
    """Debian's Chromium (``/usr/bin/chromium``), or None when it is not installed."""
    return shutil.which("chromium")


class _DevTools:
    """One CDP connection: commands answered by id, events kept in order (`events`)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._answers: dict[int, trio.MemorySendChannel] = {}
        self.events: list[dict] = []
        self._more = trio.Event()   # set (and replaced) at each event

    async def read(self) -> None:
        """The reader task: until the connection closes (then every waiting command fails)."""
        try:
            while True:
                message = json.loads(await self._ws.get_message())
                if "id" in message:
                    answer = self._answers.pop(message["id"], None)
                    if answer is not None:
                        answer.send_nowait(message)
                else:
                    self.events.append(message)
                    self._more.set()
                    self._more = trio.Event()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            for answer in self._answers.values():
                answer.close()
            self._answers.clear()

    async def call(self, method: str, session: str | None = None, **params) -> dict:
        """Send one command and wait for its answer; `BrowserError` with Chromium's message."""
        ident = next(self._ids)
        send, receive = trio.open_memory_channel(1)
        self._answers[ident] = send
        message = {"id": ident, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        await self._ws.send_message(json.dumps(message))
        try:
            answer = await receive.receive()
        except trio.EndOfChannel:
            raise BrowserError(f"{method}: the browser closed the connection") from None
        if "error" in answer:
            raise BrowserError(f"{method}: {answer['error'].get('message')}")
        return answer.get("result", {})

    async def event(self, method: str, session: str, since: int) -> dict:
        """The first event ``method`` of ``session`` at or after position ``since`` of `events`."""
        position = since
        while True:
            for event in self.events[position:]:
                if event["method"] == method and event.get("sessionId") == session:
                    return event
            position = len(self.events)
            await self._more.wait()


class Page:
    """One tab of the browser."""

    def __init__(self, devtools: _DevTools, session: str) -> None:
        self._devtools = devtools
        self._session = session
        self._errors_seen = 0
        self.errors: list[str] = []

    async def call(self, method: str, **params) -> dict:
        return await self._devtools.call(method, self._session, **params)

    async def set_viewport(self, width: int, height: int, *, mobile: bool = False, scale: float = 1.0) -> None:
        """The size of the page's window in CSS pixels (``mobile``: a phone's viewport and touch)."""
        await self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                        deviceScaleFactor=scale, mobile=mobile)
        await self.call("Emulation.setTouchEmulationEnabled", enabled=mobile)

    async def goto(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        since = len(self._devtools.events)
        answer = await self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise BrowserError(f"loading {url}: {answer['errorText']}")
        await self._devtools.event("Page.loadEventFired", self._session, since)

    async def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (a promise is awaited); `BrowserError`
        if it throws."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def wait_for(self, condition: str):
        """Wait until the JavaScript expression ``condition`` is truthy in the page, checked now and
        after every change of the DOM; its value. Bound it with the caller's own timeout."""
        return await self.evaluate(f"""new Promise((resolve) => {{
            const check = () => {{
                let value;
                try {{ value = ({condition}); }} catch (e) {{ value = undefined; }}
                if (value) {{ observer.disconnect(); resolve(value); }}
            }};
            const observer = new MutationObserver(check);
            observer.observe(document, {{subtree: true, childList: true, characterData: true, attributes: true}});
            check();
        }})""")

    async def type_into(self, selector: str, text: str) -> None:
        """Focus the element ``selector`` and type ``text`` as keyboard input."""
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.call("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        """Click the middle of the element ``selector`` with the mouse."""
        x, y = await self.evaluate(f"""(() => {{
            const box = document.querySelector({json.dumps(selector)}).getBoundingClientRect();
            return [box.x + box.width / 2, box.y + box.height / 2];
        }})()""")
        for kind in ("mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the viewport, down to its end), written to ``path``."""
        metrics = await self.call("Page.getLayoutMetrics")
        size = metrics["cssContentSize"]
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def collect_errors(self) -> list[str]:
        """The errors the page reported so far (also kept in `errors`)."""
        events = self._devtools.events
        for event in events[self._errors_seen:]:
            if event.get("sessionId") != self._session:
                continue
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                self.errors.append(details.get("exception", {}).get("description") or details.get("text", ""))
            elif event["method"] == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(" ".join(str(arg.get("value", arg.get("description"))) for arg in params["args"]))
            elif event["method"] == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                self.errors.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())
        self._errors_seen = len(events)
        return self.errors


async def _read_address(stderr: trio.abc.ReceiveStream, seen: bytearray) -> str:
    """The DevTools address Chromium prints on stderr (everything read is kept in ``seen``)."""
    while (found := _LISTENING.search(seen)) is None:
        chunk = await stderr.receive_some()
        if not chunk:
            raise BrowserError("chromium exited before it listened:\n" + seen.decode(errors="replace"))
        seen += chunk
    return found.group(1).decode()


async def _drain(stderr: trio.abc.ReceiveStream, seen: bytearray) -> None:
    """Keep reading Chromium's stderr (a full pipe would stop it)."""
    while chunk := await stderr.receive_some():
        seen += chunk


@asynccontextmanager
async def open_browser(profile: Path, *, width: int = 1280, height: int = 900) -> AsyncIterator[Page]:
    """Start headless Chromium with a fresh profile in ``profile`` and yield a blank page of
    ``width`` x ``height`` CSS pixels; Chromium and its helpers are stopped (by pid) on exit."""
    executable = chromium_path()
    if executable is None:
        raise BrowserError("chromium is not installed")
    profile.mkdir(parents=True, exist_ok=True)
    process = await trio.lowlevel.open_process(
        [executable, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    seen = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(START_TIMEOUT):
                address = await _read_address(process.stderr, seen)
            nursery.start_soon(_drain, process.stderr, seen)
            async with trio_websocket.open_websocket_url(address, max_message_size=64 * 1024 * 1024) as ws:
                devtools = _DevTools(ws)
                nursery.start_soon(devtools.read)
                target = await devtools.call("Target.createTarget", url="about:blank")
                attached = await devtools.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)
                page = Page(devtools, attached["sessionId"])
                for domain in ("Page", "Runtime", "Log"):
                    await page.call(f"{domain}.enable")
                await page.set_viewport(width, height)
                try:
                    yield page
                finally:
                    with trio.move_on_after(STOP_TIMEOUT) as cleanup:
                        cleanup.shield = True
                        try:
                            await devtools.call("Browser.close")
                        except (BrowserError, trio_websocket.ConnectionClosed):
                            pass   # it is going away: the group is killed below in any case
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(STOP_TIMEOUT) as cleanup:
            cleanup.shield = True
            await process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)   # its group: helpers left behind, or a hung browser
        except ProcessLookupError:
            pass
        with trio.CancelScope(shield=True):
            await process.wait()
