"""Workers that stay healthy, on one real Celery worker and a Redis of the
module's own (``redis-server`` on a free port): lint reads its config, a
stall (its consumer cancelled behind branchd's back, work waiting) is
healed by a restart, a consumer lost across a broker restart is added back,
a stop under a running task drains it first, and ``apps restart`` of Celery
workers rolls.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from branchctl.cli import main
from celery import Celery
from click.testing import CliRunner, Result

from branchd.api import openapi
from branchd.api.routes import ROUTES
from tests.brokers import end_process, free_port, start_redis, unreachable
from tests.conftest import Branchd, _kill_leftovers, start_branchd, wait_for

ROOT = Path(__file__).resolve().parents[2]
START = 30.0
#: Fast pings and stall looks; the slow sweep out of the way (a stall must be
#: seen by the stall check, not mended by a sweep first).
CONFIG = (
    "health_interval = 0.3\nreconcile_interval = 600.0\nstall_after = 1.5\n"
    "backoff_base = 0.2\nbackoff_max = 1.0\n"
)

pytestmark = pytest.mark.slow


@dataclass
class Rig:
    b: Branchd
    url: str
    port: int
    tmp: Path
    redis: subprocess.Popen[bytes]
    app: str
    name: str
    default: str
    extra: str

    @property
    def path(self) -> str:
        return f"/v1/apps/{self.app}/instances/{self.name}"

    def view(self) -> dict[str, Any]:
        return self.b.instance(self.app, self.name)

    def running(self, other_than: int | None = None) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            inst = self.view()
            assert inst["state"] not in ("fatal", "exited"), inst
            ok = inst["state"] == "running" and inst["pid"] not in (None, other_than)
            return inst if ok else None

        return wait_for(check, START, 0.05)  # type: ignore[no-any-return]

    def client(self) -> Celery:
        return Celery("probe", broker=self.url, task_serializer="json")

    def queues(self) -> set[str] | None:
        """The queues the worker says it consumes (None: no answer, or no broker)."""
        node = self.view()["node"]
        try:
            with self.client() as c:
                reply = c.control.inspect([node], timeout=1.0).active_queues() or {}
        except Exception:  # the broker is away (the restart test): no answer
            return None
        return {q["name"] for q in reply[node]} if node in reply else None

    def send(self, task: str, args: list[Any], queue: str) -> None:
        with self.client() as c:
            c.send_task(task, args=args, queue=queue)

    def cli(self, *args: str) -> Result:
        argv = ["--url", self.b.url, "--token", self.b.token or "", *args]
        env = {"BRANCHD_STATE_DIR": str(self.tmp / "no-such-state")}
        return CliRunner().invoke(main, argv, env=env, catch_exceptions=False)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    if shutil.which("redis-server") is None:
        unreachable("redis-server (binary)")
    tmp = tmp_path_factory.mktemp("health")
    port = free_port()
    redis = start_redis(port, tmp)
    (tmp / "branchd.toml").write_text(CONFIG)
    b = start_branchd(tmp / "state", "--config", str(tmp / "branchd.toml"))
    tok = uuid.uuid4().hex[:6]
    rig = Rig(b, f"redis://127.0.0.1:{port}/0", port, tmp, redis, f"shop-{tok}", "w1",
              f"default-{tok}", f"extra-{tok}")  # fmt: skip
    try:
        body = {
            "celery_app": "tests.celery_app.trappy",
            "broker": rig.url,
            "env": {"PYTHONPATH": str(ROOT)},
            "pool": "prefork",
        }
        b.ok("PUT", f"/v1/apps/{rig.app}", body, 201)
        fields = {"name": "w1", "kind": "celery", "queues": [rig.default], "concurrency": 1}
        b.ok("POST", f"/v1/apps/{rig.app}/instances", {**fields, "stopwaitsecs": 30}, 201)
        rig.running()
        yield rig
    finally:
        b.proc.send_signal(signal.SIGTERM)
        try:
            b.proc.wait(60)
        except subprocess.TimeoutExpired:
            b.proc.kill()
            b.proc.wait()
        _kill_leftovers(b.state_dir)
        end_process(rig.redis)


def test_lint_reads_the_running_workers_config_and_flags_its_traps(rig: Rig) -> None:
    answer = rig.b.ok("GET", f"/v1/apps/{rig.app}/lint")
    op = openapi.build(ROUTES)["paths"]["/v1/apps/{app}/lint"]["get"]
    jsonschema.validate(answer, op["responses"]["200"]["content"]["application/json"]["schema"])
    items = answer["items"]
    found = {i["rule"]: i["severity"] for i in items}
    assert found["acks_late_without_reject_on_worker_lost"] == "error", items
    assert found["time_limit_beyond_visibility_timeout"] == "error", items  # 7200 s > 3600 s
    assert "max_memory_per_child_without_prefork" not in found
    r = rig.cli("apps", "lint", rig.app)
    assert r.exit_code == 1, r.output
    assert "error: acks_late_without_reject_on_worker_lost: task_acks_late" in r.stdout
    assert len(r.stdout.splitlines()) == len(items)  # one line each
    # a per-task limit (task_overrides, not in the worker's conf) is flagged, named
    overrides = {"task_overrides": {"trappy.encode": {"time_limit": 9000}}}
    rig.b.ok("PATCH", f"/v1/apps/{rig.app}", overrides)
    try:
        again = rig.b.ok("GET", f"/v1/apps/{rig.app}/lint")["items"]
    finally:
        rig.b.ok("PATCH", f"/v1/apps/{rig.app}", {"task_overrides": None})
    named = [i for i in again if "task trappy.encode: time_limit 9000s" in i["message"]]
    assert [(i["rule"], i["severity"]) for i in named] == [
        ("time_limit_beyond_visibility_timeout", "error")
    ], again
    # an app with no running worker has no config to read
    rig.b.ok("PUT", f"/v1/apps/{rig.app}-idle", {"celery_app": "x"}, 201)
    idle = rig.b.call("GET", f"/v1/apps/{rig.app}-idle/lint")
    assert idle.status == 409 and "no running worker" in idle.body["error"]["message"]


def test_a_worker_whose_consumer_was_cancelled_behind_our_back_is_restarted(rig: Rig) -> None:
    old = rig.running()
    with rig.client() as c:  # behind branchd's back: Celery's own remote control
        c.control.cancel_consumer(rig.default, destination=[old["node"]], reply=True, timeout=2)
    wait_for(lambda: rig.queues() == set(), 10, 0.05)
    proof = rig.tmp / "after-stall"
    rig.send("testapp.touch", [str(proof)], rig.default)  # work waits; nobody takes it
    t0 = time.monotonic()
    # the reason shows from the kill until the new worker answers its first ping
    healed = wait_for(lambda: (v := rig.view())["pid"] not in (None, old["pid"]) and v, 20, 0.02)
    print(f"\nstall: restarted {time.monotonic() - t0:.1f}s after the task was sent")
    assert (healed["reason"] or "").startswith("stalled: no task taken for 1.5s"), healed
    assert rig.default in healed["reason"]
    rig.running(other_than=old["pid"])
    wait_for(proof.exists, 20, 0.05)  # the new worker took it


def test_a_consumer_lost_across_a_broker_restart_is_added_back(rig: Rig) -> None:
    rig.running()
    rig.b.ok("PUT", f"{rig.path}/queues/{rig.extra}")  # a consumer added at runtime
    assert rig.queues() == {rig.default, rig.extra}
    # lost behind branchd's back (nothing waits in it: no stall); then the
    # broker goes and comes back, and the reconnect finds the worker short of it
    with rig.client() as c:
        c.control.cancel_consumer(rig.extra, destination=[rig.view()["node"]], reply=True)
    wait_for(lambda: rig.queues() == {rig.default}, 10, 0.05)
    pid = rig.view()["pid"]
    rig.redis.terminate()
    rig.redis.wait(10)
    rig.redis = start_redis(rig.port, rig.tmp)
    wait_for(lambda: rig.queues() == {rig.default, rig.extra}, 30, 0.2)
    proof = rig.tmp / "after-broker-restart"
    rig.send("testapp.touch", [str(proof)], rig.extra)
    wait_for(proof.exists, 20, 0.05)
    assert rig.view()["pid"] == pid  # mended in place, not restarted
    # (branchd's doing, not Celery's: "reconciled w1: +extra-..." in its log,
    # perhaps beside the default queue, if the look came before Celery's own)
    mended = re.search(rf"reconciled {rig.name}: .*\+{re.escape(rig.extra)}", rig.b.log())
    assert mended is not None, rig.b.log()[-3000:]


def test_a_stop_under_a_running_task_drains_it_first(rig: Rig) -> None:
    rig.running()
    proof = rig.tmp / "slow-done"
    rig.send("testapp.sleep", [1.5], rig.default)

    def running_task() -> bool:
        active = rig.b.ok("GET", f"{rig.path}/stats")["celery"]["active"] or []
        return any(t.get("name") == "testapp.sleep" for t in active)

    wait_for(running_task, 20, 0.02)
    t0 = time.monotonic()
    stopped = rig.b.ok("POST", f"{rig.path}/stop")
    took = time.monotonic() - t0
    assert (stopped["state"], stopped["stop_step"], stopped["exit_code"]) == (
        "stopped",
        "drain",
        0,
    ), stopped
    assert took >= 0.5, took  # it waited for the task (1.5 s, started a moment before)
    del proof

    # branchctl apps restart of an app of Celery workers rolls by default
    r = rig.cli("apps", "restart", rig.app)
    assert r.exit_code == 0, (r.stdout, r.stderr)
    assert "1 instance(s), 1 at a time" in r.stderr
    assert f"{rig.app}/{rig.name}: running" in r.stdout  # running: it answered a ping
