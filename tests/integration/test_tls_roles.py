"""Issue 17, parts 4 and 5, with real daemons: HTTPS with a certificate the
test makes, named tokens and their roles (403 naming the role needed), an
audit line per write, SIGHUP rereading the token file, two branches
clustering over TLS, and sd_notify against a NOTIFY_SOCKET of the test's own.

One pair of daemons for the whole module (A holds the instances and the
notify socket; B joins it over https).
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from branchd.cluster.keyring import generate_key
from tests.conftest import Branchd, Reply, _kill_leftovers, _reply, start_branchd, wait_for

SLEEPER = [sys.executable, "-c", "import time; time.sleep(3600)"]
READER = "reader-token-0123456789abcdef"
OPERATOR = "operator-token-0123456789abcdef"
LATER = "later-token-0123456789abcdef"


def make_certificate(where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost (its own CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "branchd test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = where / "cert.pem", where / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def token_file(path: Path, **roles: tuple[str, str]) -> None:
    path.write_text(
        "".join(f'[tokens.{n}]\ntoken = "{t}"\nrole = "{r}"\n\n' for n, (t, r) in roles.items())
    )
    path.chmod(0o600)


@dataclass
class Setup:
    a: Branchd
    b: Branchd
    ca: ssl.SSLContext
    tokens: Path
    notify: socket.socket
    cert: Path

    def call(self, x: Branchd, method: str, path: str, token: str, body: Any = None) -> Reply:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(x.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.ca) as resp:
                return _reply(resp.status, resp.read(), dict(resp.headers))
        except urllib.error.HTTPError as err:
            return _reply(err.code, err.read(), dict(err.headers))

    def admin(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        assert self.a.token is not None
        reply = self.call(self.a, method, path, self.a.token, body)
        assert reply.status == status, (reply.status, reply.text)
        return reply.body


def _stop(d: Branchd) -> None:
    d.proc.send_signal(signal.SIGTERM)
    try:
        d.proc.wait(30)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()
    _kill_leftovers(d.state_dir)


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(root)
    ca = ssl.create_default_context(cafile=str(cert))
    tokens = root / "tokens.toml"
    token_file(tokens, reader=(READER, "read"), oper=(OPERATOR, "operate"))
    cluster_key = root / "cluster.key"
    cluster_key.write_text(generate_key() + "\n")
    cluster_key.chmod(0o600)
    tls = ("--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(cert))
    both = (*tls, "--token-file", str(tokens), "--cluster-key-file", str(cluster_key))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    address = f"@branchd-test-{uuid.uuid4().hex}"
    notify.bind("\0" + address[1:])
    notify.settimeout(0.05)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    a: Branchd | None = None
    b: Branchd | None = None
    try:
        a = start_branchd(root / "a", *both, env=env)
        b = start_branchd(root / "b", *both, "--join", a.url)
        setup = Setup(a, b, ca, tokens, notify, cert)
        for x in (a, b):
            wait_for(lambda x=x: len(_alive(setup, x)) == 2, 15)
        yield setup
    finally:
        for d in (b, a):
            if d is not None:
                _stop(d)
        notify.close()


def _alive(s: Setup, x: Branchd) -> list[str]:
    reply = s.call(x, "GET", "/v1/branches", READER)
    return [m["id"] for m in reply.body["items"] if m["state"] == "alive"]


def _running(s: Setup, name: str) -> str:
    path = f"/v1/apps/web/instances/{name}"
    wait_for(lambda: s.call(s.a, "GET", path, READER).body["state"] == "running", 15)
    return path


@pytest.fixture(scope="module")
def instance(s: Setup) -> str:
    s.admin("PUT", "/v1/apps/web", {}, status=201)
    here = s.admin("GET", "/v1/branch")["id"]
    body = {"name": "w1", "command": SLEEPER}
    s.admin("POST", f"/v1/apps/web/instances?branch={here}", body, status=201)
    return _running(s, "w1")


def test_https_with_a_self_signed_certificate(s: Setup) -> None:
    assert s.a.url.startswith("https://127.0.0.1:")
    assert s.call(s.a, "GET", "/v1/branch", READER).status == 200
    # without the CA the certificate is not trusted; plain http is not spoken
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(s.a.url + "/v1/ping", timeout=10)
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen("http" + s.a.url.removeprefix("https") + "/v1/ping", timeout=10)


def test_a_read_token_cannot_stop_anything(s: Setup, instance: str) -> None:
    for verb in ("stop", "restart"):
        reply = s.call(s.a, "POST", f"{instance}/{verb}", READER)
        assert reply.status == 403, reply.text
        error = reply.body["error"]
        assert error["code"] == "forbidden" and (error["needs"], error["has"]) == (
            "operate",
            "read",
        )
        assert error["message"] == (
            f"POST /v1/apps/{{app}}/instances/{{name}}/{verb} needs role operate; "
            "token 'reader' has read"
        )
    assert s.call(s.a, "POST", "/v1/apps/web/stop", READER).status == 403
    assert s.call(s.a, "GET", instance, READER).body["state"] == "running"
    assert s.call(s.a, "GET", instance, "not-a-token").status == 401


def test_an_operate_token_stops_and_starts_but_cannot_delete_an_app(
    s: Setup, instance: str
) -> None:
    assert s.call(s.a, "POST", f"{instance}/stop", OPERATOR).status == 200
    assert s.call(s.a, "GET", instance, READER).body["state"] == "stopped"
    assert s.call(s.a, "POST", f"{instance}/start", OPERATOR).status == 200
    _running(s, "w1")
    reply = s.call(s.a, "DELETE", "/v1/apps/web", OPERATOR)
    assert reply.status == 403
    assert reply.body["error"]["message"].endswith("needs role admin; token 'oper' has operate")
    assert s.call(s.a, "GET", "/v1/apps/web", READER).status == 200
    # every write has its audit line: who, method, path, status
    log = s.a.log()
    assert f"audit: reader POST {instance}/stop -> 403" in log
    assert f"audit: oper POST {instance}/stop -> 200" in log
    assert "audit: oper DELETE /v1/apps/web -> 403" in log


def test_two_branches_cluster_and_forward_over_tls(s: Setup, instance: str) -> None:
    record = s.call(s.b, "GET", "/v1/branch", READER).body
    assert record["api_url"].startswith("https://")
    # asked of B, answered by A (the owner), over https with the cluster CA
    reply = s.call(s.b, "GET", instance, READER)
    assert reply.status == 200 and reply.body["branch"] != record["id"]
    # a forwarded write is checked at the first branch, audited at the owner
    assert s.call(s.b, "POST", f"{instance}/stop", READER).status == 403
    assert s.call(s.b, "POST", f"{instance}/restart", OPERATOR).status == 200
    assert f"audit: oper via {record['id']} POST {instance}/restart -> 200" in s.a.log()


def test_the_notify_protocol_says_ready_status_and_watchdog(s: Setup) -> None:
    seen: list[str] = []

    def both() -> bool:
        with contextlib.suppress(TimeoutError):
            seen.extend(s.notify.recv(4096).decode().splitlines())
        return "READY=1" in seen and "WATCHDOG=1" in seen

    wait_for(both, 10, 0)
    assert any(line.startswith("STATUS=listening on https://") for line in seen)
    assert f"MAINPID={s.a.pid}" in seen


def test_branchctl_over_https_with_the_ca_says_the_role_needed(s: Setup, instance: str) -> None:
    def branchctl(token: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "BRANCHD_URL": s.a.url, "BRANCHD_TOKEN": token}
        env["BRANCHD_TLS_CA"] = str(s.cert)
        cmd = [str(Path(sys.executable).with_name("branchctl")), *args]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)

    shown = branchctl(READER, "instances", "show", "web", "w1")
    assert shown.returncode == 0 and "running" in shown.stdout, shown.stderr
    refused = branchctl(READER, "instances", "stop", "web", "w1")
    assert refused.returncode != 0 and "needs role operate" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_sighup_rereads_the_token_file_and_keeps_it_when_bad(s: Setup, instance: str) -> None:
    assert s.call(s.a, "GET", instance, LATER).status == 401
    token_file(s.tokens, reader=(READER, "operate"), later=(LATER, "read"))
    s.a.signal(signal.SIGHUP)
    wait_for(lambda: s.call(s.a, "GET", instance, LATER).status == 200, 10)
    assert s.call(s.a, "POST", f"{instance}/restart", READER).status == 200
    assert s.call(s.a, "GET", instance, OPERATOR).status == 401  # (oper: gone)
    s.tokens.write_text("[tokens.x]\nrole = 'root'\n")
    s.a.signal(signal.SIGHUP)
    wait_for(lambda: "tokens unchanged" in s.a.log(), 10)
    assert s.call(s.a, "GET", instance, LATER).status == 200
