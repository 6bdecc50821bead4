"""branchctl import into a real daemon: Zulip's supervisord config (as Zulip
wrote it, tests/data/supervisord/zulip) becomes its apps and instances; a
second import changes nothing; a dry run changes nothing.

The commands are Zulip's own, which cannot run here (no /home/zulip, no user
zulip): the import still declares every instance, which then ends fatal
with the reason, as it would on a machine without Zulip. The file is not
altered to make them run: what is tested is the declaration.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from branchctl.cli import main
from click.testing import CliRunner, Result

from tests.conftest import Branchd, _kill_leftovers, start_branchd

ZULIP = Path(__file__).parent.parent / "data" / "supervisord" / "zulip" / "conf.d" / "zulip.conf"
#: What an instance answer holds that is live state, not declaration.
LIVE = {"state", "pid", "restarts", "exit_code", "started_at", "uptime", "stop_step", "reason"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Branchd]:
    b = start_branchd(tmp_path_factory.mktemp("import") / "state")
    yield b
    b.proc.send_signal(signal.SIGTERM)
    try:
        b.proc.wait(30)
    except subprocess.TimeoutExpired:
        b.proc.kill()
        b.proc.wait()
    _kill_leftovers(b.state_dir)


def run(b: Branchd, *args: str) -> Result:
    env = {"BRANCHD_STATE_DIR": str(b.state_dir.parent / "no-such-state")}
    return CliRunner().invoke(
        main, ["--url", b.url, "--token", b.token or "", *args], env=env, catch_exceptions=False
    )


def declared(b: Branchd) -> dict[str, dict[str, Any]]:
    """Every instance's declaration, by name."""
    out: dict[str, dict[str, Any]] = {}
    for app in b.ok("GET", "/v1/apps")["items"]:
        for item in b.ok("GET", f"/v1/apps/{app['name']}/instances")["items"]:
            full = b.ok("GET", f"/v1/apps/{app['name']}/instances/{item['name']}")
            out[item["name"]] = {k: v for k, v in full.items() if k not in LIVE}
    return out


def test_import_zulip_twice_and_dry_runs(daemon: Branchd, tmp_path: Path) -> None:
    r = run(daemon, "import", str(ZULIP), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "app zulip-workers: create" in r.output
    assert "instances: 19 to create" in r.output and "dry run: nothing was changed" in r.output
    assert "[fcgi-program:zulip-django]: branchd holds no socket" in r.output
    assert daemon.ok("GET", "/v1/apps")["items"] == []

    r = run(daemon, "import", str(ZULIP))
    assert r.exit_code == 0, r.output
    assert "apps: 3 created" in r.output and "instances: 19 created" in r.output
    apps = sorted(a["name"] for a in daemon.ok("GET", "/v1/apps")["items"])
    assert apps == ["zulip-senders", "zulip-tornado", "zulip-workers"]
    before = declared(daemon)
    assert len(before) == 19
    sender = before["zulip-events-message_sender-2"]
    assert sender["app"] == "zulip-senders" and sender["user"] == "zulip"
    assert sender["command"][-1] == "--worker_num=2" and sender["stopwaitsecs"] == 30
    assert sender["log_max_bytes"] == 1024**3 and sender["startretries"] == 4

    r = run(daemon, "--json", "import", str(ZULIP))
    assert r.exit_code == 0, r.output
    actions = {s["action"] for s in json.loads(r.output)["steps"]}
    assert actions == {"unchanged"}
    assert declared(daemon) == before

    edited = tmp_path / "zulip.conf"
    edited.write_text(
        ZULIP.read_text().replace("runtornado 127.0.0.1:9993", "runtornado 127.0.0.1:9994")
    )
    r = run(daemon, "import", str(edited), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "instance zulip-tornado: update (command:" in r.output
    assert "instances: 0 to create, 1 to update, 18 unchanged" in r.output
    assert declared(daemon) == before
    r = run(daemon, "import", str(edited))
    assert r.exit_code == 0, r.output
    after = declared(daemon)
    assert after["zulip-tornado"]["command"][-1] == "127.0.0.1:9994"
    assert {k: v for k, v in after.items() if k != "zulip-tornado"} == {
        k: v for k, v in before.items() if k != "zulip-tornado"
    }


def test_a_bad_file_creates_nothing(daemon: Branchd, tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[program:fine]\ncommand=/bin/true\n\n[program:broken]\nstartsecs=1\n")
    r = run(daemon, "import", str(bad))
    assert r.exit_code == 1
    assert r.stderr.strip().splitlines() == [f"branchctl: {bad}:4: [program:broken] has no command"]
    assert "fine" not in {a["name"] for a in daemon.ok("GET", "/v1/apps")["items"]}


def test_import_celerys_sample_as_a_celery_instance_twice(daemon: Branchd) -> None:
    celeryd = ZULIP.parent.parent.parent / "celery" / "celeryd.conf"
    r = run(daemon, "import", str(celeryd), "--celery")
    assert r.exit_code == 0, r.output
    assert "instance celery: create [celery]" in r.output
    app = daemon.ok("GET", "/v1/apps/celery")
    assert app["celery_app"] == "proj" and app["embedded_broker"] is True
    inst = daemon.ok("GET", "/v1/apps/celery/instances/celery")
    assert inst["kind"] == "celery" and inst["loglevel"] == "INFO"
    assert inst["stopwaitsecs"] == 600 and inst["user"] == "nobody"
    r = run(daemon, "import", str(celeryd), "--celery")
    assert r.exit_code == 0, r.output
    assert "apps: 0 created, 0 updated, 1 unchanged" in r.output
    assert "instances: 0 created, 0 updated, 1 unchanged" in r.output
    r = run(daemon, "import", str(celeryd))  # without --celery: a process, refused
    assert r.exit_code == 1 and "the kind cannot change" in r.stderr
