"""Broker URLs through the API: refused with a 422 that names the problem, and a
bad URL already in the database (from an older branchd) crashes nothing."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
from collections.abc import Callable

from tests.conftest import SLEEPER, Branchd, wait_for

CELERY = {"celery_app": "tests.celery_app.tasks", "pool": "solo"}


def test_bad_broker_urls_are_422_naming_the_rule(branchd: Branchd) -> None:
    for url, problem in [
        ("aqmp://guest:guest@127.0.0.1:5672//", "unknown transport 'aqmp', did you mean 'amqp'?"),
        ("redis://127.0.0.1:99999/0", "host or port does not parse"),
        ("filesystem:///tmp/x", "filesystem:// takes no path or options"),
    ]:
        reply = branchd.call("PUT", "/v1/apps/shop", {**CELERY, "broker": url})
        assert reply.status == 422, reply.text
        assert reply.body["error"]["code"] == "invalid"
        assert problem in reply.body["error"]["message"], reply.body
        assert "guest:guest" not in reply.text
    assert branchd.call("GET", "/v1/apps/shop").status == 404  # nothing stored


def test_bare_filesystem_url_is_the_embedded_broker(branchd: Branchd) -> None:
    app = branchd.ok("PUT", "/v1/apps/shop", {**CELERY, "broker": "filesystem://"}, 201)
    assert app["embedded_broker"] is True
    assert app["broker"] == "filesystem://"  # what a producer uses (folders: celery-config)


def test_a_bad_url_stored_by_an_older_branchd_fails_its_workers_not_the_daemon(
    branchd_factory: Callable[..., Branchd],
) -> None:
    b = branchd_factory()
    b.ok("PUT", "/v1/apps/shop", {**CELERY, "broker": "amqp://127.0.0.1:5672//"}, 201)
    b.ok("PUT", "/v1/apps/web", {}, 201)
    b.ok("POST", "/v1/apps/shop/instances", {"name": "w1", "kind": "celery"}, 201)
    b.ok("POST", "/v1/apps/web/instances", {"name": "sleeper", "command": SLEEPER}, 201)
    b.signal(signal.SIGTERM)
    assert b.wait_exit() == 0
    with contextlib.closing(sqlite3.connect(b.state_dir / "branchd.db")) as db:
        (raw,) = db.execute("SELECT record FROM apps WHERE name = 'shop'").fetchone()
        db.execute(
            "UPDATE apps SET record = ? WHERE name = 'shop'",
            (json.dumps({**json.loads(raw), "broker": "aqmp://127.0.0.1:5672//"}),),
        )
        db.commit()

    b = branchd_factory(state_dir=b.state_dir)
    assert b.ok("GET", "/v1/apps/shop")["broker"] == "aqmp://127.0.0.1:5672//"
    b.ok("GET", "/v1/apps")
    b.wait_state("web", "sleeper", "running")  # the other app is untouched

    def failed() -> dict[str, str] | None:
        inst = b.instance("shop", "w1")
        return inst if inst["state"] in ("backoff", "fatal") else None

    inst = wait_for(failed, 15)
    assert "app 'shop' has a bad broker URL: unknown transport 'aqmp'" in inst["reason"], inst
    assert "Traceback" not in b.log()
