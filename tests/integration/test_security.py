"""Secure by default (issue 11, items 1 and 2), against real daemons: the token
generated and required, web pages and DNS rebinding refused, instances with
a clean environment, the state dir private."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from branchctl import Client
from branchctl.cli import main
from click.testing import CliRunner

from tests.conftest import Branchd, Reply, _reply, wait_for

PRINT_ENV = [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"]
DAEMON = [sys.executable, "-m", "branchd"]
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (to run as nobody)")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def send(
    b: Branchd,
    method: str,
    path: str,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = None,
) -> Reply:
    """One request with exactly these headers (and the token unless given '')."""
    req = urllib.request.Request(b.url + path, data=data, method=method)
    for key, value in (headers or {}).items():
        req.add_header(key, value)
    tok = b.token if token is None else token
    if tok:
        req.add_header("Authorization", f"Bearer {tok}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return _reply(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as err:
        return _reply(err.code, err.read(), dict(err.headers))


def error_code(reply: Reply) -> str:
    assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
    assert isinstance(reply.body, dict), reply.text
    return str(reply.body["error"]["code"])


def printed_env(b: Branchd, app: str, name: str) -> dict[str, str]:
    def read() -> dict[str, str] | None:
        text = b.call("GET", f"/v1/apps/{app}/instances/{name}/logs?tail=1").text.strip()
        return json.loads(text) if text.startswith("{") else None

    env: dict[str, str] = wait_for(read)
    return env


# -- the token -------------------------------------------------------------


def test_a_token_is_made_at_first_start_and_kept(branchd_factory: Callable[..., Branchd]) -> None:
    b = branchd_factory()
    token_file = b.state_dir / "token"
    assert _mode(token_file) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32 and b.token == token
    # every route but ping needs it, on loopback too
    for method, path in (("GET", "/v1/apps"), ("GET", "/v1/branch"), ("PUT", "/v1/apps/web")):
        reply = send(b, method, path, b"{}", {"Content-Type": "application/json"}, token="")
        assert (reply.status, error_code(reply)) == (401, "unauthorized"), (method, path)
    assert send(b, "GET", "/v1/apps", token="wrong").status == 401
    assert send(b, "GET", "/v1/ping", token="").body == {"ok": True}
    assert send(b, "GET", "/v1/apps").status == 200
    assert "API token in" in b.log() and "--token" not in b.log()

    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    again = branchd_factory(state_dir=b.state_dir)
    assert again.token == token and _mode(token_file) == 0o600
    assert send(again, "GET", "/v1/apps", token=token).status == 200


def test_a_token_on_the_command_line_is_said_to_be_visible(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [*DAEMON, "--state-dir", str(state), "--bind", "127.0.0.1:0", "--token", "s3cret"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (state / "branchd.url").exists())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "every local user sees it" in err
    # and the local clients find the token in force
    assert (state / "token").read_text().strip() == "s3cret"


def test_no_auth_is_explicit_and_warned(branchd_factory: Callable[..., Branchd]) -> None:
    b = branchd_factory("--no-auth")
    assert send(b, "GET", "/v1/apps", token="").status == 200
    assert "authentication is OFF" in b.log()
    assert not (b.state_dir / "token").exists()


def test_no_auth_is_refused_off_loopback(tmp_path: Path) -> None:
    out = subprocess.run(
        [*DAEMON, "--state-dir", str(tmp_path), "--bind", "0.0.0.0:0", "--no-auth"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "without a token" in out.stderr and "Traceback" not in out.stderr


# -- web pages and DNS rebinding ---------------------------------------------


@pytest.mark.parametrize("auth", ["token", "no-auth"])
def test_a_web_page_cannot_create_an_instance(
    auth: str, branchd_factory: Callable[..., Branchd]
) -> None:
    # --no-auth: the case where only these checks stand between a page and root
    b = branchd_factory(*(["--no-auth"] if auth == "no-auth" else []))
    assert b.call("PUT", "/v1/apps/web", {}).status == 201
    body = json.dumps({"name": "pwn", "command": ["/bin/true"]}).encode()
    path = "/v1/apps/web/instances"
    # a form or text/plain POST needs no preflight: refused even with the token
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        reply = send(b, "POST", path, body, {"Content-Type": kind})
        assert (reply.status, error_code(reply)) == (415, "unsupported_media_type"), kind
    reply = send(b, "POST", path, body, {})  # urllib says x-www-form-urlencoded
    assert reply.status == 415
    # what a page's fetch() sends: its own Origin
    for origin in ("http://evil.example", "null", "http://127.0.0.1:1"):
        headers = {"Content-Type": "text/plain", "Origin": origin}
        reply = send(b, "POST", path, body, headers)
        assert (reply.status, error_code(reply)) == (403, "forbidden"), origin
        reply = send(b, "GET", "/v1/apps", headers={"Origin": origin})
        assert reply.status == 403, origin
    assert b.ok("GET", path)["items"] == []  # nothing was created
    # the daemon's own origin is fine, and so is JSON with a charset
    own = {"Origin": b.url, "Content-Type": "application/json; charset=utf-8"}
    assert send(b, "POST", path, body, own).status == 201


def test_dns_rebinding_is_refused(branchd_factory: Callable[..., Branchd]) -> None:
    b = branchd_factory()
    port = b.url.rsplit(":", 1)[1]
    for host in (f"evil.example:{port}", "evil.example", f"10.0.0.1:{port}", f"[::2]:{port}"):
        reply = send(b, "GET", "/v1/apps", headers={"Host": host})
        assert (reply.status, error_code(reply)) == (421, "misdirected_request"), host
        body = b'{"name": "pwn", "command": ["/bin/true"]}'
        json_type = {"Host": host, "Content-Type": "application/json"}
        assert send(b, "PUT", "/v1/apps/pwn", body, json_type).status == 421
        # the same origin as the rebound name does not help
        both = {"Host": host, "Origin": f"http://{host}"}
        assert send(b, "GET", "/v1/apps", headers=both).status == 421
    assert b.call("GET", "/v1/apps/pwn").status == 404
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost"):
        assert send(b, "GET", "/v1/apps", headers={"Host": host}).status == 200, host


# -- clients find the token --------------------------------------------------


def test_the_cli_needs_no_flag_as_the_same_user(
    branchd: Branchd, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"BRANCHD_URL": None, "BRANCHD_TOKEN": None, "BRANCHD_TOKEN_FILE": None}
    env["BRANCHD_STATE_DIR"] = str(branchd.state_dir)
    r = CliRunner().invoke(main, ["apps", "add", "web"], env=env, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["--json", "apps"], env=env, catch_exceptions=False)
    assert [a["name"] for a in json.loads(r.output)["items"]] == ["web"]
    # an explicit loopback URL still reads the state dir's token
    r = CliRunner().invoke(main, ["--url", branchd.url, "apps"], env=env)
    assert r.exit_code == 0, r.output
    # a token file elsewhere
    elsewhere = branchd.state_dir.parent / "my-token"
    elsewhere.write_text(f"{branchd.token}\n")
    other = {**env, "BRANCHD_STATE_DIR": "/nonexistent"}
    r = CliRunner().invoke(main, ["--url", branchd.url, "apps"], env=other)
    assert r.exit_code == 1 and "unauthorized" in r.stderr
    # ... and the one line says where the token was looked for
    assert "none readable in /nonexistent/token" in r.stderr and len(r.stderr.splitlines()) == 1
    r = CliRunner().invoke(main, ["--url", branchd.url, "--token-file", str(elsewhere), "apps"])
    assert r.exit_code == 0, r.output
    # the Python client, with no argument at all
    for key, value in env.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    with Client() as c:
        assert [a.name for a in c.apps()] == ["web"]


def test_a_token_is_never_sent_to_another_host(tmp_path: Path) -> None:
    from branchctl.client import find_token

    (tmp_path / "token").write_text("local-secret\n")
    env = {"BRANCHD_STATE_DIR": str(tmp_path)}
    assert find_token(env, "http://127.0.0.1:8400") == "local-secret"
    assert find_token(env, "localhost:8400") == "local-secret"
    assert find_token(env, "http://[::1]:8400") == "local-secret"
    assert find_token(env, "http://branch-2.example:8400") is None
    # unless it is the URL this state dir's daemon wrote (it binds every address)
    (tmp_path / "branchd.url").write_text("http://10.1.2.3:8400\n")
    assert find_token(env, "http://10.1.2.3:8400/") == "local-secret"


# -- instances' environment and the state dir's modes -------------------------


def test_an_instance_gets_a_clean_environment(branchd_factory: Callable[..., Branchd]) -> None:
    daemon_env = {"BRANCHD_TOKEN": "from-the-env", "BRANCHD_LEAK": "x", "UNRELATED_SECRET": "y"}
    b = branchd_factory(env=daemon_env)
    assert b.token == "from-the-env"
    app_env = {"FOO": "app", "BRANCHD_STATE_DIR": "/elsewhere"}
    b.ok("PUT", "/v1/apps/web", {"env": app_env}, 201)
    spec = {"name": "env", "command": PRINT_ENV, "env": {"BAR": "inst"}, "startsecs": 0}
    b.ok("POST", "/v1/apps/web/instances", spec, 201)
    env = printed_env(b, "web", "env")
    assert not [k for k in env if k.startswith("BRANCHD_")], env
    assert "UNRELATED_SECRET" not in env
    assert (env["FOO"], env["BAR"]) == ("app", "inst")
    assert env["PATH"] == os.environ["PATH"]
    me = pwd.getpwuid(os.geteuid())
    assert (env["HOME"], env["USER"], env["LOGNAME"]) == (me.pw_dir, me.pw_name, me.pw_name)


def test_the_state_dir_is_private(branchd_factory: Callable[..., Branchd], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    b = branchd_factory(state_dir=state)
    b.ok("PUT", "/v1/apps/web", {"env": {"PASSWORD": "hunter2"}}, 201)
    b.ok("POST", "/v1/apps/web/instances", {"name": "e", "command": PRINT_ENV}, 201)
    printed_env(b, "web", "e")
    assert _mode(state) == 0o700
    assert _mode(state / "branchd.db") == 0o600
    for companion in ("branchd.db-wal", "branchd.db-shm"):
        if (state / companion).exists():
            assert _mode(state / companion) == 0o600, companion
    assert _mode(state / "token") == 0o600
    for log in ("e.stdout.log", "e.stderr.log"):
        assert _mode(state / "logs" / "web" / log) == 0o640, log


# -- as another user (root only) ------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every user may pass through (pytest's tmp_path is root's alone),
    so that only the state dir's own mode keeps others out."""
    path = Path(tempfile.mkdtemp(prefix="branchd-sec-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    nobody = pwd.getpwnam("nobody")
    return subprocess.run(
        list(argv),
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


@ROOT_ONLY
def test_another_user_has_no_way_in(
    branchd_factory: Callable[..., Branchd], open_dir: Path
) -> None:
    b = branchd_factory(state_dir=open_dir / "state")
    nobody = pwd.getpwnam("nobody")
    # an instance run as nobody: nobody's own base, no BRANCHD_*, no state dir
    b.ok("PUT", "/v1/apps/web", {}, 201)
    spec: dict[str, Any] = {"command": ["/usr/bin/env"], "user": "nobody", "startsecs": 0}
    b.ok("POST", "/v1/apps/web/instances", {"name": "env", **spec}, 201)

    def lines() -> list[str] | None:
        out = b.call("GET", "/v1/apps/web/instances/env/logs?tail=100").text
        return out.splitlines() if "LOGNAME=" in out else None

    env = dict(line.split("=", 1) for line in wait_for(lines) if "=" in line)
    assert not [k for k in env if k.startswith("BRANCHD_")], env
    assert (env["USER"], env["HOME"]) == ("nobody", nobody.pw_dir)
    log = b.state_dir / "logs" / "web" / "env.stdout.log"
    assert (log.stat().st_uid, _mode(log)) == (nobody.pw_uid, 0o640)
    ls = ["/bin/ls", str(b.state_dir)]
    b.ok("POST", "/v1/apps/web/instances", {"name": "ls", **spec, "command": ls}, 201)
    wait_for(lambda: "denied" in b.call("GET", "/v1/apps/web/instances/ls/logs?stream=stderr").text)

    # a client as nobody cannot read the token, and without it gets nothing
    assert _as_nobody("/bin/cat", str(b.state_dir / "token")).returncode != 0
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("no /usr/bin/python3 to run a client as nobody")
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    urllib.request.urlopen(sys.argv[1] + '/v1/apps', timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
    )
    out = _as_nobody("/usr/bin/python3", "-I", "-c", code, b.url)
    assert out.stdout.strip() == "401", out.stderr
