"""The dashboard at ``/``: its files need no token and change none of the API's
rules; in a real headless Chromium it logs in with the token, shows a real
instance, and its stop and start buttons act on it (seen in the page and
through the API). The screenshot it takes is the one docs/guide.md shows
(``BRANCHD_SCREENSHOT=docs/dashboard.png`` writes it there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import webdriver
from tests.conftest import SLEEPER, Branchd, _kill_leftovers, start_branchd, wait_for

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
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(30)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
        _kill_leftovers(daemon.state_dir)


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
