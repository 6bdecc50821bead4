"""Pure parts of start order and probes (``branchd.process.probes``), and the
fields as a create or a patch gives them (``specs``): tables."""

from __future__ import annotations

from typing import Any

import pytest

from branchd.errors import Invalid
from branchd.model import App, InstanceSpec, Kind, State
from branchd.process.probes import (
    Dep,
    Notice,
    Probe,
    ProbeKind,
    after_problem,
    parse_notice,
    parse_probe,
    ready_retry_delay,
    start_order,
    stop_tiers,
    waiting_for,
)
from branchd.process.specs import apply_fields, build_spec, creation_fields

TCP, HTTP, EXEC, NOTIFY = ProbeKind.TCP, ProbeKind.HTTP, ProbeKind.EXEC, ProbeKind.NOTIFY


@pytest.mark.parametrize(
    ("given", "probe", "text"),
    [
        ("tcp:127.0.0.1:5432", Probe(TCP, host="127.0.0.1", port=5432), "tcp:127.0.0.1:5432"),
        (" tcp:db.local:1 ", Probe(TCP, host="db.local", port=1), "tcp:db.local:1"),
        ("tcp:[::1]:80", Probe(TCP, host="::1", port=80), "tcp:[::1]:80"),
        ("tcp:::1:80", Probe(TCP, host="::1", port=80), "tcp:[::1]:80"),
        ("http://127.0.0.1:8080/health", Probe(HTTP, url="http://127.0.0.1:8080/health"), None),
        ("http:http://h/x?y=1", Probe(HTTP, url="http://h/x?y=1"), "http://h/x?y=1"),
        ("http:https://h", Probe(HTTP, url="https://h"), "https://h"),
        ("https://h:8443/", Probe(HTTP, url="https://h:8443/"), None),
        ("exec:pg_isready -h localhost", Probe(EXEC, argv=("pg_isready", "-h", "localhost")), None),
        ("exec:test -e '/a b'", Probe(EXEC, argv=("test", "-e", "/a b")), None),
        (
            {"exec": ["pg_isready", "-q"]},
            Probe(EXEC, argv=("pg_isready", "-q")),
            "exec:pg_isready -q",
        ),
        ({"exec": ("a b",)}, Probe(EXEC, argv=("a b",)), "exec:'a b'"),
        ("notify", Probe(NOTIFY), None),
    ],
)
def test_probes_parse_and_keep_one_text(given: Any, probe: Probe, text: str | None) -> None:
    assert parse_probe(given) == probe
    want = given if text is None else text
    assert probe.text == want
    assert parse_probe(probe.text) == probe  # (the stored text reads back the same)


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("tcp:127.0.0.1", "give tcp:HOST:PORT"),
        ("tcp::5432", "give tcp:HOST:PORT"),
        ("tcp:h:0", "a port 1-65535"),
        ("tcp:h:65536", "a port 1-65535"),
        ("tcp:h:x", "give tcp:HOST:PORT"),
        ("tcp:a/b:1", "is not a host name"),
        ("http:", 'give "tcp:HOST:PORT"'),
        ("http://", "give a URL like"),
        ("http://h:99999/", "bad http probe"),
        ("http://h/a b", "give a URL like"),
        ("ftp://h", 'give "tcp:HOST:PORT"'),
        ("exec:", "give a command after 'exec:'"),
        ("exec:'unclosed", "No closing quotation"),
        ({"exec": []}, "non-empty list of strings"),
        ({"exec": [""]}, "non-empty list of strings"),
        ({"exec": "pg_isready"}, "non-empty list of strings"),
        ({"tcp": "h:1"}, "bad probe"),
        ("udp:h:53", "bad probe"),
        ("Notify", "bad probe"),
        ("", "bad probe"),
        (5432, "bad probe"),
    ],
)
def test_bad_probes_say_which_forms_there_are(given: Any, says: str) -> None:
    with pytest.raises(ValueError, match=r"bad .*probe") as err:
        parse_probe(given)
    assert says in str(err.value)


@pytest.mark.parametrize(
    ("datagram", "notice"),
    [
        (b"READY=1", Notice(ready=True)),
        (b"STATUS=loading 3/10\n", Notice(status="loading 3/10")),
        (b"READY=1\nSTATUS=serving", Notice(ready=True, status="serving")),
        (b"READY=0", Notice()),
        (b"MAINPID=4\nWATCHDOG=1\nnonsense", Notice()),
        (b"STATUS=", Notice()),
        (b"STATUS=" + b"x" * 300, Notice(status="x" * 200)),
        (b"\xff\xfeREADY=1", Notice()),  # (a bad byte spoils its line only)
        (b"\xff\n READY=1\nREADY=1", Notice(ready=True)),
    ],
)
def test_sd_notify_datagrams(datagram: bytes, notice: Notice) -> None:
    assert parse_notice(datagram) == notice


def test_ready_retries_start_quick_and_are_capped() -> None:
    assert [ready_retry_delay(n) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    assert ready_retry_delay(10**6) == 0.5


@pytest.mark.parametrize(
    ("deps", "why"),
    [
        ([], None),
        ([Dep("db", State.RUNNING)], None),
        ([Dep("db", State.STOPPED)], "waiting for db (stopped)"),
        ([Dep("db", None)], "waiting for db (no such instance)"),
        ([Dep("db", State.STARTING)], "waiting for db (starting)"),
        (
            [Dep("db", State.STARTING, "not ready: tcp 127.0.0.1:5432 refused")],
            "waiting for db (not ready: tcp 127.0.0.1:5432 refused)",
        ),
        (
            [Dep("db", State.WAITING, "waiting for cache (stopped)")],
            "waiting for db (waiting for cache (stopped))",
        ),
        ([Dep("db", State.FATAL, "gave up")], "waiting for db (fatal: gave up)"),
        ([Dep("db", State.STOPPING, "x")], "waiting for db (stopping)"),
        (
            [Dep("a", State.RUNNING), Dep("b", State.BACKOFF, "boom"), Dep("c", State.EXITED)],
            "waiting for b (backoff: boom), c (exited)",
        ),
    ],
)
def test_what_a_dependent_waits_for(deps: list[Dep], why: str | None) -> None:
    assert waiting_for(deps) == why


def test_a_chain_of_waits_says_a_bounded_reason() -> None:
    why = "not ready: x"
    for n in range(100):
        why = waiting_for([Dep(f"d{n}", State.WAITING, why)]) or ""
    assert len(why) == 500 and why.startswith("waiting for d99 (waiting for d98 (")
    assert why.endswith("...")


@pytest.mark.parametrize(
    ("name", "after", "others", "problem"),
    [
        ("api", ["db"], {"db": []}, None),
        ("api", ["db", "cache"], {"db": ["cache"], "cache": []}, None),
        ("api", ["api"], {}, "after: 'api' cannot start after itself"),
        (
            "api",
            ["db", "x", "y"],
            {"db": []},
            "after: no instance 'x', 'y' in app 'web' (after names instances of the same app, "
            "created before it)",
        ),
        ("a", ["b"], {"b": ["a"]}, "after: a cycle (a -> b -> a): start order cannot loop"),
        (
            "a",
            ["b"],
            {"b": ["c"], "c": ["a"]},
            "after: a cycle (a -> b -> c -> a): start order cannot loop",
        ),
        ("a", ["b"], {"b": ["c"], "c": ["b"]}, None),  # (a loop not through a: not this one's)
        ("a", [], {"b": ["a"]}, None),
    ],
)
def test_after_problems_name_the_rule(
    name: str, after: list[str], others: dict[str, list[str]], problem: str | None
) -> None:
    assert after_problem("web", name, after, others) == problem


def spec(name: str, priority: int = 999, after: tuple[str, ...] = ()) -> InstanceSpec:
    return InstanceSpec("web", name, ("x",), "b", priority=priority, after=after)


def test_start_order_is_by_priority_then_dependencies_then_name() -> None:
    specs = [
        spec("web", 20, ("api",)),
        spec("api", 20, ("db",)),
        spec("zz", 20),
        spec("db", 20),
        spec("cache", 5),
        spec("beat", 999),
        spec("aa", 999, ("elsewhere",)),  # (a name not among them: no depth)
    ]
    assert start_order(specs) == ["cache", "db", "zz", "api", "web", "aa", "beat"]
    assert stop_tiers(specs) == [["aa", "beat"], ["web"], ["api"], ["db", "zz"], ["cache"]]
    assert start_order([]) == [] and stop_tiers([]) == []


def test_a_cycle_from_elsewhere_never_loops_the_order() -> None:
    # (refused when declared; a record from another branch must still not hang us)
    specs = [spec("a", after=("b",)), spec("b", after=("a",))]
    assert sorted(start_order(specs)) == ["a", "b"]


APP = App("web")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"after": ["bad name"]}, "after: 'bad name' is not an instance name"),
        ({"after": ["db", "db"]}, "after: names must not repeat"),
        ({"after_timeout": 0}, "after_timeout must be more than 0 seconds"),
        ({"ready_timeout": -1}, "ready_timeout must be more than 0 seconds"),
        ({"live_period": 0}, "live_period must be more than 0 seconds"),
        ({"live_failures": 0}, "live_failures must be at least 1"),
        ({"ready": "udp:h:1"}, "ready: bad probe 'udp:h:1'"),
        ({"live": "notify"}, "live: notify says when a process is ready"),
    ],
)
def test_bad_order_and_probe_fields_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(Invalid) as err:
        build_spec(APP, "api", {"command": ["x"], **fields}, "b", 0.0)
    assert err.value.message.startswith(message)


def test_order_and_probe_fields_are_kept_as_declared() -> None:
    s = build_spec(
        APP,
        "api",
        {
            "command": ["x"],
            "after": ["db"],
            "after_timeout": 5,
            "priority": -3,
            "ready": "http:http://127.0.0.1/h",
            "ready_timeout": 2,
            "live": {"exec": ["check", "a b"]},
            "live_period": 1,
            "live_timeout": 0.5,
            "live_failures": 4,
        },
        "b",
        0.0,
    )
    assert (s.after, s.priority, s.ready, s.live) == (
        ("db",),
        -3,
        "http://127.0.0.1/h",
        "exec:check 'a b'",
    )
    assert (s.policy.after_timeout, s.policy.ready_timeout, s.policy.live_failures) == (5, 2, 4)
    assert (s.live_period, s.live_timeout) == (1.0, 0.5)
    assert InstanceSpec.from_wire(s.to_wire()) == s
    cleared = apply_fields(s, {"after": [], "ready": None, "live": None})
    assert (cleared.after, cleared.ready, cleared.live) == ((), None, None)
    # a move makes it again with all of them
    body = creation_fields(s)
    assert {k: body[k] for k in ("after", "priority", "ready", "live", "live_failures")} == {
        "after": ["db"],
        "priority": -3,
        "ready": "http://127.0.0.1/h",
        "live": "exec:check 'a b'",
        "live_failures": 4,
    }


def test_probes_are_for_process_instances_and_an_apps_do_not_reach_its_workers() -> None:
    with pytest.raises(Invalid, match="ready: only for a process instance"):
        build_spec(App("shop"), "w", {"kind": "celery", "ready": "notify"}, "b", 0)
    shop = App("shop", defaults={"ready": "notify", "priority": 3})
    worker = build_spec(shop, "w", {"kind": "celery"}, "b", 0.0)
    assert worker.kind == Kind.CELERY and worker.ready is None and worker.priority == 3
    assert "ready" not in creation_fields(worker)
