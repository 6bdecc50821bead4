"""A minimal W3C WebDriver client (standard library only) for a headless
Chromium driven by Debian's chromedriver: enough for the dashboard test.

chromedriver speaks WebDriver over plain HTTP on 127.0.0.1, so urllib is all
it takes; no selenium, no browser download.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
#: The key W3C WebDriver names an element reference with.
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def missing() -> str | None:
    """Why the browser cannot run here (None: it can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.access(path, os.X_OK) or shutil.which(Path(path).name)):
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    return None


class WebDriverError(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Browser:
    """One WebDriver session."""

    base: str  # http://127.0.0.1:PORT/session/ID

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = json.dumps(body if body is not None else {}).encode() if method == "POST" else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())["value"]
        except urllib.error.HTTPError as err:
            with err:
                value = json.loads(err.read() or b"{}").get("value", {})
            raise WebDriverError(
                f"{method} {path}: {value.get('error')}: {value.get('message')}"
            ) from None

    def get(self, url: str) -> None:
        self.call("POST", "/url", {"url": url})

    def run(self, script: str, *args: Any) -> Any:
        """Run ``script`` (a function body) in the page; ``arguments`` are ``args``."""
        return self.call("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        found = self.call("POST", "/element", {"using": "css selector", "value": css})
        return str(found[ELEMENT])

    def click(self, css: str) -> None:
        self.call("POST", f"/element/{self.find(css)}/click")

    def type(self, css: str, text: str) -> None:
        self.call("POST", f"/element/{self.find(css)}/value", {"text": text})

    def text(self, css: str) -> str | None:
        """The text of the first element ``css`` matches (None: no such element)."""
        value = self.run(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            css,
        )
        return None if value is None else str(value)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("GET", "/screenshot"))


@contextmanager
def chromium(width: int = 1100, height: int = 640) -> Iterator[Browser]:
    """A headless Chromium session; the driver and the browser end with it."""
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="branchd-chromium-")
    driver_bin = CHROMEDRIVER if os.access(CHROMEDRIVER, os.X_OK) else "chromedriver"
    driver = subprocess.Popen(
        [driver_bin, f"--port={port}", "--allowed-ips=127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(root + "/status", timeout=2) as resp:
                    if json.loads(resp.read())["value"].get("ready"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or driver.poll() is not None:
                raise WebDriverError("chromedriver did not come up")
            time.sleep(0.05)
        args = [
            "--headless=new",
            # CI runs as root, where Chromium's sandbox refuses to start
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
        ]
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
                }
            }
        }
        session = Browser(root).call("POST", "/session", caps, timeout=60)
        browser = Browser(f"{root}/session/{session['sessionId']}")
        try:
            yield browser
        finally:
            with suppress(WebDriverError, OSError):
                browser.call("DELETE", "", timeout=10)
    finally:
        driver.terminate()
        try:
            driver.wait(10)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        shutil.rmtree(profile, ignore_errors=True)
