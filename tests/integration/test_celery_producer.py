"""A zero-service Celery: producers take their settings from branchd.

The embedded broker plus the default file result backend must carry a whole
canvas (a chain into a chord) with results, with nothing but the settings
``GET /v1/apps/{app}/celery-config`` answers; ``branchctl celery`` runs
Celery's own CLI with them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
from branchctl import Client

from tests.brokers import AMQP_URL
from tests.conftest import Branchd

ROOT = Path(__file__).resolve().parents[2]
BRANCHCTL = Path(sys.executable).with_name("branchctl")

#: A producer of the user's own: it knows its tasks, and takes the rest from branchd.
PRODUCER = """
import sys
from celery import chain, chord
from branchctl import Client
from tests.celery_app.tasks import add, app, tsum

with Client(sys.argv[1]) as c:
    app.conf.update(c.celery_config(sys.argv[2]))
print(add.delay(2, 3).get(timeout=30))
canvas = chain(add.s(1, 1), chord([add.s(i) for i in range(4)], tsum.s()))
print(canvas.apply_async().get(timeout=60))
"""


def _embedded_shop(branchd: Branchd, name: str, worker: str = "w1") -> None:
    body = {"celery_app": "tests.celery_app.tasks", "defaults": {"cwd": str(ROOT)}}
    branchd.ok("PUT", f"/v1/apps/{name}", body, status=201)
    inst = {"name": worker, "kind": "celery", "concurrency": 2}
    branchd.ok("POST", f"/v1/apps/{name}/instances", inst, status=201)
    branchd.wait_state(name, worker, "running", timeout=30)


def test_celery_config_of_the_embedded_broker(branchd: Branchd) -> None:
    branchd.ok("PUT", "/v1/apps/shop", {"celery_app": "tests.celery_app.tasks"}, status=201)
    body = {"exchange": "media", "exchange_type": "topic", "routing_key": "image.#"}
    branchd.ok("PUT", "/v1/apps/shop/queues/images", body, status=201)
    setup = branchd.ok("GET", "/v1/apps/shop/celery-config")
    config = setup["config"]
    assert config["broker_url"] == "filesystem://"
    data = branchd.state_dir.resolve() / "broker" / "apps" / "shop" / "data"
    assert config["broker_transport_options"]["data_folder_in"] == str(data)
    results = branchd.state_dir.resolve() / "results" / "shop"
    assert config["result_backend"] == f"file://{results}"
    assert results.is_dir()  # Celery refuses a file store whose folder is missing
    assert config["task_queues"] == {"images": body}
    assert setup["env"]["CELERY_BROKER_URL"] == "filesystem://"
    assert setup["env"]["CELERY_RESULT_BACKEND"] == config["result_backend"]
    assert json.loads(setup["env"]["BRANCHD_BROKER_TRANSPORT_OPTIONS"])["data_folder_in"]
    # the app's own answer names a URL a producer can use, and the store
    app = branchd.ok("GET", "/v1/apps/shop")
    assert app["broker"] == "filesystem://"
    assert app["result_backend"] == config["result_backend"]


def test_celery_config_of_a_real_broker_app(branchd: Branchd) -> None:
    body = {"celery_app": "shop.tasks", "broker": AMQP_URL}
    branchd.ok("PUT", "/v1/apps/shop", body, status=201)
    config = branchd.ok("GET", "/v1/apps/shop/celery-config")["config"]
    # no transport options to hand over, and the app module's own result backend
    assert config == {"broker_url": AMQP_URL}
    branchd.ok("PATCH", "/v1/apps/shop", {"result_backend": "redis://127.0.0.1:6379/13"})
    config = branchd.ok("GET", "/v1/apps/shop/celery-config")["config"]
    assert config == {"broker_url": AMQP_URL, "result_backend": "redis://127.0.0.1:6379/13"}


def test_a_canvas_runs_on_the_embedded_broker_with_results(branchd: Branchd) -> None:
    app = f"shop-{uuid.uuid4().hex[:6]}"
    _embedded_shop(branchd, app)
    inst = branchd.instance(app, "w1")
    # the result store is in the worker's environment, not on its command line
    assert "--result-backend" not in inst["command"] and "-b" not in inst["command"]
    # (the client finds the daemon's token in its state dir, as a user's would)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "BRANCHD_STATE_DIR": str(branchd.state_dir)}
    done = subprocess.run(
        [sys.executable, "-c", PRODUCER, branchd.url, app],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    # add(2, 3); then add(1, 1) = 2 into the chord header add(2, i), summed
    assert done.stdout.split() == ["5", str(sum(2 + i for i in range(4)))]


def test_branchctl_celery_runs_celerys_own_cli(branchd: Branchd, tmp_path: Path) -> None:
    app = f"shop-{uuid.uuid4().hex[:6]}"
    _embedded_shop(branchd, app)
    env = {k: v for k, v in os.environ.items() if k not in ("BRANCHD_TOKEN", "PYTHONPATH")}
    env["BRANCHD_URL"] = branchd.url
    env["BRANCHD_STATE_DIR"] = str(branchd.state_dir)
    done = subprocess.run(
        [str(BRANCHCTL), "celery", app, "--", "inspect", "ping", "--timeout", "5"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # the app's cwd, not ours, is where its module is found
        timeout=60,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    node = branchd.instance(app, "w1")["node"]
    assert f"{node}: OK" in done.stdout and "pong" in done.stdout
    # an app without a module says so, in one line
    branchd.ok("PUT", "/v1/apps/plain", {}, status=201)
    bad = subprocess.run(
        [str(BRANCHCTL), "celery", "plain", "--", "inspect", "ping"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [
        "branchctl: app 'plain' has no celery_app (set it: branchctl apps set plain "
        "--celery-app MODULE)"
    ]


def test_python_client_celery_config(branchd: Branchd) -> None:
    branchd.ok("PUT", "/v1/apps/shop", {}, status=201)
    with Client(branchd.url, token=branchd.token) as c:
        config = c.celery_config("shop")
        setup = c.celery_setup("shop")
    assert config == setup["config"]
    assert config["broker_url"] == "filesystem://"


def test_result_backend_urls_are_checked_and_a_get_makes_no_folder(
    branchd: Branchd, tmp_path: Path
) -> None:
    reply = branchd.call("PUT", "/v1/apps/shop", {"result_backend": "file://relative"})
    assert reply.status == 422 and "absolute folder" in reply.text, reply.text
    theirs = tmp_path / "not-yet"
    body = {"celery_app": "shop.tasks", "result_backend": f"file://{theirs}"}
    branchd.ok("PUT", "/v1/apps/shop", body, status=201)
    config = branchd.ok("GET", "/v1/apps/shop/celery-config")["config"]
    assert config["result_backend"] == f"file://{theirs}"
    assert not theirs.exists()  # a read never makes the user's folders


def test_the_env_form_carries_queue_declarations(branchd: Branchd) -> None:
    body = {"celery_app": "shop.tasks", "broker": AMQP_URL}
    branchd.ok("PUT", "/v1/apps/shop", body, status=201)
    binding = {"exchange": "media", "exchange_type": "topic", "routing_key": "image.#"}
    branchd.ok("PUT", "/v1/apps/shop/queues/images", binding, status=201)
    env = branchd.ok("GET", "/v1/apps/shop/celery-config")["env"]
    # the loader adds them to task_queues of any celery command: a topic-bound
    # queue is declared by whoever sends to it (else the message is dropped)
    assert json.loads(env["BRANCHD_TASK_QUEUES"]) == {"images": binding}
    assert env["CELERY_LOADER"] == "branchd_worker_loader:Loader"
    hook = Path(env["PYTHONPATH"])
    assert (hook / "branchd_worker_loader.py").exists()


def test_two_apps_on_the_embedded_broker_do_not_share_it(branchd: Branchd) -> None:
    apps = [f"a-{uuid.uuid4().hex[:6]}", f"b-{uuid.uuid4().hex[:6]}"]
    for app in apps:
        _embedded_shop(branchd, app, worker=f"w-{app}")
    folders = {
        app: branchd.ok("GET", f"/v1/apps/{app}/celery-config")["config"][
            "broker_transport_options"
        ]["data_folder_in"]
        for app in apps
    }
    assert len(set(folders.values())) == 2
    env = {k: v for k, v in os.environ.items() if k not in ("BRANCHD_TOKEN", "PYTHONPATH")}
    env["BRANCHD_URL"] = branchd.url
    env["BRANCHD_STATE_DIR"] = str(branchd.state_dir)
    done = subprocess.run(
        [str(BRANCHCTL), "celery", apps[0], "--", "inspect", "ping", "--timeout", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert f"w-{apps[0]}@" in done.stdout and f"w-{apps[1]}@" not in done.stdout
    assert "1 node online" in done.stdout


def test_an_adopted_worker_shows_the_command_it_runs(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    app = f"ad-{uuid.uuid4().hex[:6]}"
    _embedded_shop(b, app, worker=f"w-{app}")
    name = f"w-{app}"
    started = b.instance(app, name)["command"]
    b.signal(signal.SIGUSR2)  # an upgrade: the worker keeps running
    assert b.wait_exit() == 0
    again = branchd_factory(state_dir=b.state_dir)
    again.wait_state(app, name, "running", timeout=30)
    changed = again.ok("PATCH", f"/v1/apps/{app}/instances/{name}", {"pool": "solo"})
    # the running worker still runs prefork: that is what it shows until restarted
    assert changed["command"] == started and "--pool=prefork" in started
    pid = changed["pid"]
    assert list(psutil.Process(pid).cmdline()) == started
