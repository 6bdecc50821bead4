"""The dashboard at ``/``: its files need no token and change none of the API's
rules; in a real headless Chromium it logs in with the token, shows a real
instance, and its stop and start buttons act on it (seen in the page and
through the API). The screenshot it takes is the one docs/guide.md shows
(``BRANCHD_SCREENSHOT=docs/dashboard.png`` writes it there)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from branchd.api import dashboard
from tests import webdriver
from tests.conftest import SLEEPER, Branchd, start_branchd, stop_branchd, wait_for

FAST = {"command": SLEEPER, "startsecs": 0, "stopwaitsecs": 5}
SAYS_READY = "import time; print('mailer ready', flush=True); time.sleep(1e9)"


@pytest.fixture(scope="module")
def b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Branchd]:
    daemon = start_branchd(tmp_path_factory.mktemp("dashboard") / "state")
    try:
        daemon.ok("PUT", "/v1/apps/web", {}, status=201)
        mailer = {**FAST, "command": [sys.executable, "-c", SAYS_READY]}
        for body in ({"name": "api", **FAST}, {"name": "mailer", **mailer}):
            daemon.ok("POST", "/v1/apps/web/instances", body, status=201)
        for name in ("api", "mailer"):
            daemon.ok("POST", f"/v1/apps/web/instances/{name}/start")
        yield daemon
    finally:
        stop_branchd(daemon)


@pytest.mark.parametrize("path", ["/", "/ui/app.js", "/ui/style.css"])
def test_the_page_and_its_files_need_no_token(b: Branchd, path: str) -> None:
    reply = b.call("GET", path, token="")
    assert reply.status == 200, reply.text
    assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
    assert reply.headers["X-Frame-Options"] == "DENY"
    assert "branchd" in reply.text or path != "/"


@pytest.mark.parametrize("path", ["/ui/", "/ui/../branchd.db", "/ui/token", "/index.html"])
def test_nothing_else_is_served_as_a_file(b: Branchd, path: str) -> None:
    reply = b.call("GET", path, token="")
    assert reply.status in (401, 404), (path, reply.status, reply.text)
    assert reply.body["error"]["code"] in ("not_found", "unauthorized")


def test_the_api_still_wants_the_token_and_the_same_origin(b: Branchd) -> None:
    assert b.call("GET", "/v1/apps", token="").status == 401
    # a page elsewhere, even one holding the token, is refused before anything stops
    req = urllib.request.Request(
        b.url + "/v1/apps/web/instances/api/stop",
        method="POST",
        headers={"Origin": "http://evil.example", "Authorization": f"Bearer {b.token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    with err.value:
        assert err.value.code == 403
    assert b.instance("web", "api")["state"] == "running"


def _browser_or_skip() -> None:
    why = webdriver.missing()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: .ci/run installs it in CI")
    pytest.skip(why)


def _page_state(browser: webdriver.Browser, key: str) -> str | None:
    return browser.run(  # type: ignore[no-any-return]
        'const c = document.querySelector(`tr[data-key="${arguments[0]}"] .state`);'
        "return c ? c.getAttribute('data-state') : null;",
        key,
    )


def test_stop_and_start_from_the_page(b: Branchd, tmp_path: Path) -> None:
    _browser_or_skip()
    with webdriver.chromium() as browser:
        browser.get(b.url + "/")
        wait_for(lambda: browser.run("return !document.getElementById('login').hidden;"))
        assert b.token is not None
        browser.type("#token", b.token)
        browser.click("#connect")
        wait_for(lambda: _page_state(browser, "web/api") == "running")
        # the token stays in this tab's session, never in its local storage
        assert browser.run("return sessionStorage.getItem('branchd.token');") == b.token
        assert browser.run("return localStorage.length;") == 0
        assert browser.text("#branches tbody tr .state") == "alive"

        browser.click('tr[data-key="web/api"] button[data-action="stop"]')
        wait_for(lambda: _page_state(browser, "web/api") == "stopped")
        assert b.instance("web", "api")["state"] == "stopped"
        assert b.instance("web", "mailer")["state"] == "running"

        browser.click('tr[data-key="web/api"] button[data-action="start"]')
        wait_for(lambda: _page_state(browser, "web/api") == "running")
        assert b.instance("web", "api")["state"] == "running"
        wait_for(
            lambda: (browser.text(".app[data-key='web'] .counts") or "").startswith("2 running")
        )

        browser.click('tr[data-key="web/mailer"] button[data-action="logs"]')
        wait_for(
            lambda: "mailer ready" in (browser.text('tr[data-key="web/mailer#logs"] pre') or "")
        )
        assert browser.run("return document.body.getAttribute('data-live');") in (
            "events",
            "polling",
        )
        png = browser.screenshot()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "dashboard.png").write_bytes(png)
    if target := os.environ.get("BRANCHD_SCREENSHOT"):
        Path(target).write_bytes(png)


def _listing(make: Callable[[], list[Any]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"items": make()})

    return answer


class _FakeEvents:
    """A daemon with GET /v1/events, as branchd will have it (being built in
    parallel): the page's own files, one app, and a stream the test feeds."""

    def __init__(self) -> None:
        self.state = "running"
        self.events: asyncio.Queue[str | None] | None = None
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _instance(self) -> dict[str, object]:
        return {
            "name": "w1",
            "app": "ev",
            "state": self.state,
            "desired": "running",
            "restarts": 0,
            "uptime": 1.0,
            "reason": None,
            "branch": "b1",
        }

    async def _events(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": hello\n\n")
        assert self.events is not None
        while (data := await self.events.get()) is not None:
            await resp.write(f"id: 1\nevent: instance\ndata: {data}\n\n".encode())
        return resp

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        dashboard.add_routes(app)
        items = {
            "/v1/branches": lambda: [{"id": "b1", "state": "alive", "self": True}],
            "/v1/apps": lambda: [{"name": "ev"}],
            "/v1/apps/ev/instances": lambda: [self._instance()],
        }
        for path, make in items.items():
            app.router.add_get(path, _listing(make))
        app.router.add_get("/v1/events", self._events)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.events = asyncio.Queue()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())
        self.loop.close()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def emit(self, state: str) -> None:
        self.state = state
        assert self.events is not None
        self.loop.call_soon_threadsafe(self.events.put_nowait, json.dumps({"state": state}))

    def stop(self) -> None:
        if self.events is not None:  # the stream ends, so the cleanup need not wait for it
            self.loop.call_soon_threadsafe(self.events.put_nowait, None)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_the_page_follows_the_event_stream_when_the_daemon_has_one() -> None:
    _browser_or_skip()
    fake = _FakeEvents()
    fake.start()
    try:
        with webdriver.chromium() as browser:
            browser.get(fake.url + "/")
            wait_for(
                lambda: browser.run("return document.body.getAttribute('data-live');") == "events"
            )
            wait_for(lambda: _page_state(browser, "ev/w1") == "running")
            # with a stream the page does not poll: only the event brings the change
            fake.emit("backoff")
            wait_for(lambda: _page_state(browser, "ev/w1") == "backoff")
    finally:
        fake.stop()
