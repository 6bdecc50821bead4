"""The README's install alone, without the test extras, runs a worker on every broker.

Every other test runs in ``.venv``, which ``./test.sh`` fills with the test
extras and their dependencies: a package branchd needs but does not declare
goes unnoticed there as long as some test tool pulls it in. (Issue 12: kombu
5.7's Redis transport imports ``packaging``, which only kombu's ``redis``
extra brings; after ``pip install -e .`` a Redis broker did not work.)

So this module builds a virtualenv of its own with the README's
``pip install -e .`` and nothing else, and checks what a user needs: kombu's
transports load, and a daemon started from that venv runs a ``celery worker``
from that venv that answers its ping on each broker.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import AMQP_URL, REDIS_URL, delete_amqp, reachable, unreachable
from tests.conftest import Branchd, wait_for

ROOT = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.celery_app.tasks"
#: kombu's names for the transports of the three brokers branchd is tested on.
TRANSPORTS = ("pyamqp", "redis", "filesystem")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The interpreter of a new virtualenv holding ``pip install -e <repo>`` alone."""
    venv = tmp_path_factory.mktemp("fresh-install") / "venv"
    python = venv / "bin" / "python"
    t0 = time.monotonic()
    # --without-pip: the venv would only get a copy of pip to run once (~3 s);
    # our pip installs into it (--python) with the same resolver and indexes.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    argv = [sys.executable, "-m", "pip", "--python", str(python), "install"]
    argv += ["--quiet", "--disable-pip-version-check", "-e", str(ROOT)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    print(f"\nfresh venv with pip install -e . in {time.monotonic() - t0:.1f}s")
    return str(python)


def test_kombu_transports_load(fresh_python: str) -> None:
    code = (
        "import sys\n"
        "from kombu.transport import resolve_transport\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        resolve_transport(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(bad))\n"
    )
    run = subprocess.run(
        [fresh_python, "-c", code, *TRANSPORTS], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "", f"transports that do not load:\n{run.stdout}"


@pytest.mark.parametrize("kind", ["filesystem", "amqp", "redis"])
def test_a_worker_runs_on_each_broker(
    kind: str, fresh_python: str, branchd_factory: Callable[..., Branchd]
) -> None:
    url = {"amqp": AMQP_URL, "redis": REDIS_URL}.get(kind)
    if url is not None and not reachable(url):
        unreachable(url)
    b = branchd_factory(python=fresh_python)
    tok = uuid.uuid4().hex[:8]
    app, name, queue = f"fresh-{tok}", f"fresh-w-{tok}", f"fresh-q-{tok}"
    body: dict[str, Any] = {
        "celery_app": APP_MODULE,
        "env": {"PYTHONPATH": str(ROOT)},  # the workers import the test app
        "pool": "solo",
    }
    if url is not None:
        body["broker"] = url
    b.ok("PUT", f"/v1/apps/{app}", body, 201)
    try:
        t0 = time.monotonic()
        b.ok(
            "POST",
            f"/v1/apps/{app}/instances",
            {"name": name, "kind": "celery", "queues": [queue]},
            201,
        )

        def running() -> dict[str, Any] | None:
            inst = b.instance(app, name)
            if inst["state"] in ("backoff", "fatal", "exited"):
                err = b.call("GET", f"/v1/apps/{app}/instances/{name}/logs?stream=stderr&tail=30")
                raise AssertionError(f"{inst['state']}: {inst['reason']}\n{err.text}")
            return inst if inst["state"] == "running" else None

        inst = wait_for(running, 60, 0.05)
        print(f"\n{kind}: running (answered a ping) {time.monotonic() - t0:.2f}s after create")
        assert inst["command"][0] == fresh_python  # the worker is the fresh venv's
        assert "Traceback" not in b.log()
        assert b.call("DELETE", f"/v1/apps/{app}").status == 204
    finally:
        if url is not None and kind == "amqp":
            delete_amqp(url, queues=[queue], exchanges=[queue])
