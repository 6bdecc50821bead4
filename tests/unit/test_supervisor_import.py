"""branchctl import, offline: real-world supervisord configs (tests/data/supervisord,
see its README for where each comes from) into apps and instances, what is not
converted and why, bad files, and the plan against what a branch holds."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
from branchctl.errors import BadConfig
from branchctl.supervisor.celery import worker_of
from branchctl.supervisor.convert import (
    PROGRAM,
    Conversion,
    Drop,
    Field,
    ImportOptions,
    NoteKind,
    convert,
    environment,
)
from branchctl.supervisor.ini import DiskReader
from branchctl.supervisor.plan import Action, Existing, plan

DATA = Path(__file__).parent.parent / "data" / "supervisord"
OPTS = ImportOptions(environ={"HOME": "/home/me"}, host="box")


def load(rel: str, opts: ImportOptions = OPTS) -> Conversion:
    return convert(str(DATA / rel), DiskReader(), opts)


def apps(conv: Conversion) -> dict[str, dict[str, dict[str, Any]]]:
    return {a.name: {i.name: dict(i.fields) for i in a.instances} for a in conv.apps}


def dropped(conv: Conversion) -> list[str]:
    return [n.subject for n in conv.notes if n.kind is NoteKind.NOT_CONVERTED]


def notes(conv: Conversion) -> list[str]:
    return [n.why for n in conv.notes if n.kind is NoteKind.NOTE]


# -- real-world files ------------------------------------------------------------


def test_celery_sample_worker_without_celery_flag_is_a_process_with_a_note() -> None:
    conv = load("celery/celeryd.conf")
    inst = apps(conv)["celery"]["celery"]
    assert inst["kind"] == "process"
    assert inst["command"] == ["celery", "-A", "proj", "worker", "--loglevel=INFO"]
    assert inst["user"] == "nobody" and inst["cwd"] == "/path/to/project"
    assert inst["autorestart"] == "always" and inst["startsecs"] == 10
    assert inst["stopwaitsecs"] == 600
    assert any("--celery would make it a celery instance" in n for n in notes(conv))
    assert inst["priority"] == 1000  # (start order: issue 15, part 3)
    assert sorted(dropped(conv)) == [
        "[program:celery] stderr_logfile=/var/log/celery/worker.log",
        "[program:celery] stdout_logfile=/var/log/celery/worker.log",
    ]  # stopasgroup=true is what branchd does: nothing lost, nothing said


def test_celery_sample_worker_with_celery_flag_is_a_celery_instance() -> None:
    conv = load("celery/celeryd.conf", ImportOptions(celery=True, broker="amqp://h//"))
    (app,) = conv.apps
    assert app.celery == {"celery_app": "proj", "broker": "amqp://h//"}
    inst = apps(conv)["celery"]["celery"]
    assert inst["kind"] == "celery" and "command" not in inst
    assert inst["loglevel"] == "INFO" and inst["stopwaitsecs"] == 600
    # what the file leaves out keeps branchd's Celery defaults (ping readiness)
    assert "log_max_bytes" not in inst and "exitcodes" not in inst
    assert any("branchd's own Python" in n for n in notes(conv))


def test_celery_beat_is_no_worker() -> None:
    conv = load("celery/celerybeat.conf", ImportOptions(celery=True))
    inst = apps(conv)["celerybeat"]["celerybeat"]
    assert inst["kind"] == "process" and inst["command"][3] == "beat"


def test_celery_sample_supervisord_conf_is_refused_like_supervisord_does() -> None:
    with pytest.raises(BadConfig) as exc:
        load("celery/supervisord.conf")
    (line,) = exc.value.problems
    assert line.endswith("supervisord.conf:24: [include] has no 'files' setting "
                         "(supervisord refuses it too)")  # fmt: skip


def test_zulip_groups_numprocs_and_fcgi() -> None:
    conv = load("zulip/conf.d/zulip.conf")
    got = apps(conv)
    assert sorted(got) == ["zulip-senders", "zulip-tornado", "zulip-workers"]
    assert len(got["zulip-workers"]) == 13
    senders = got["zulip-senders"]
    assert sorted(senders) == [f"zulip-events-message_sender-{n}" for n in range(5)]
    three = senders["zulip-events-message_sender-3"]
    assert three["command"][-1] == "--worker_num=3"
    assert three["log_max_bytes"] == 1024**3 and three["log_backups"] == 10
    assert three["user"] == "zulip" and three["stopwaitsecs"] == 30
    assert three["startretries"] == 4  # supervisord's 3 retries after the first try
    subjects = dropped(conv)
    assert "[fcgi-program:zulip-django]" in subjects
    assert "[unix_http_server]" in subjects
    assert got["zulip-tornado"]["zulip-tornado"]["priority"] == 200
    assert not any("priority" in subject for subject in subjects)
    assert "[program:zulip-tornado] redirect_stderr=true" in subjects
    assert not any("zulip-django" in a for a in got)


def test_zulip_main_file_includes_that_match_nothing_are_said() -> None:
    conv = load("zulip/supervisord.conf")
    assert conv.apps == ()
    assert sum("no file matches /etc/supervisor/conf.d" in n for n in notes(conv)) == 2
    assert "[supervisord] minfds=40000" in dropped(conv)


def test_zulip_postsetup_command_is_split_as_supervisord_splits_it() -> None:
    conv = load("zulip/conf.d/zulip_postsetup.conf")
    inst = apps(conv)["zulip-postsetup-create_user"]["zulip-postsetup-create_user"]
    text = (DATA / "zulip/conf.d/zulip_postsetup.conf").read_text()
    command = next(line for line in text.splitlines() if line.startswith("command"))
    assert inst["command"] == shlex.split(command.split("=", 1)[1])
    assert inst["exitcodes"] == [0, 1, 127] and inst["autorestart"] == "never"
    assert "[program:zulip-postsetup-create_user] stdout_events_enabled=true" in dropped(conv)


def test_supervisor_fixtures_include_here_and_env_expansions() -> None:
    conv = load("supervisor/include.conf")
    assert conv.apps == ()
    here = str(DATA / "supervisor" / "example")
    assert "[supervisord] childlogdir=%(here)s" in dropped(conv)
    assert any(n.where.startswith(here) for n in conv.notes)

    conv = load("supervisor/issue-1170a.conf")  # [supervisord] environment feeds ENV_
    (app,) = conv.apps
    assert app.env == {"FOO": "set from [supervisord] section"}
    assert app.instances[0].fields["command"][-1] == "echo 'set from [supervisord] section'"
    assert app.instances[0].fields["startretries"] == 1  # startretries=0: one try

    conv = load("supervisor/issue-1170b.conf")  # the program's own environment wins
    inst = conv.apps[0].instances[0].fields
    assert inst["command"][-1] == "echo 'set from [program] section'"
    assert inst["env"] == {"FOO": "set from [program] section"}

    conv = load("supervisor/issue-986.conf")  # %% is a literal %
    assert conv.apps[0].instances[0].fields["command"][-1].startswith("echo 'dhcrelay -d -q -a %h")

    conv = load("supervisor/issue-565.conf")
    assert conv.apps[0].instances[0].fields["command"] == [
        "bash",
        str(DATA / "supervisor" / "hello.sh"),
    ]
    assert "[eventlistener:listener]" in dropped(conv)


def test_a_name_branchd_cannot_take_is_renamed_and_said() -> None:
    conv = load("supervisor/issue-664.conf")
    assert apps(conv) == {"test_oau": {"test_oau": apps(conv)["test_oau"]["test_oau"]}}
    assert "named 'test_oau' in branchd (was 'test_öäü')" in notes(conv)


def test_supervisors_sample_program_with_every_option(tmp_path: Path) -> None:
    """sample.conf has every [program:x] option commented out: uncommented
    here (in a copy), each is converted or listed, none silently dropped."""
    text = (DATA / "supervisor" / "sample.conf").read_text()
    start = text.index(";[program:theprogramname]")
    end = text.index(";[eventlistener:")
    lines = text[start:end].splitlines()
    block = "\n".join(line[1:] for line in lines if line.startswith(";") and line[1:2].strip())
    copy = tmp_path / "sample.conf"
    copy.write_text(text[:start] + block + "\n" + text[end:])
    conv = convert(str(copy), DiskReader(), OPTS)
    inst = apps(conv)["theprogramname"]["theprogramname"]
    assert inst["command"] == ["/bin/cat"] and inst["cwd"] == "/tmp"
    assert inst["stopsignal"] == "QUIT" and inst["user"] == "chrism"
    assert inst["log_max_bytes"] == 1024**2 and inst["env"] == {"A": "1", "B": "2"}
    said = {s.split("] ", 1)[1].split("=")[0] for s in dropped(conv) if "[program:" in s}
    assert said == {"umask", "redirect_stderr", "stdout_logfile", "stderr_logfile",
                    "stdout_capture_maxbytes", "stderr_capture_maxbytes",
                    "stopasgroup", "killasgroup"}  # fmt: skip
    options = {line.split("=")[0] for line in block.splitlines() if "=" in line}
    for option in options:
        assert option in PROGRAM, option  # every supervisord option has a rule


def test_every_dropped_option_says_why() -> None:
    for key, rule in PROGRAM.items():
        if isinstance(rule, Drop):
            assert len(rule.why) > 10, key
        assert isinstance(rule, Drop | Field) or rule.what, key


# -- bad files: one line each, file:line ---------------------------------------------

BAD = [
    ("syntax.conf", ["syntax.conf:3: cannot read 'this line has no equals sign'"]),
    ("no_header.conf", ["no_header.conf:1: 'command=/bin/true' comes before any [section]",
                        "no_header.conf:2: [program:a] has no command"]),
    ("unknown_section.conf", ["unknown_section.conf:4: unknown section [programs:b]"]),
    ("no_command.conf", ["no_command.conf:1: [program:a] has no command"]),
    ("bad_values.conf", ["bad_values.conf:1: [program:a] numprocs=2 needs %(process_num)s",
                         "bad_values.conf:3: [program:a] startsecs=soon: expected a whole number",
                         "bad_values.conf:4: [program:a] autorestart=maybe: expected true, "]),
    ("unknown_expansion.conf", ["unknown_expansion.conf:2: [program:a] command: unknown "
                                "expansion %(ENV_BRANCHD_TEST_NO_SUCH_VAR)s"]),
    ("bad_quote.conf", ["bad_quote.conf:2: [program:a] command: No closing quotation"]),
    ("unknown_program.conf", ["unknown_program.conf:2: [group:g] names unknown program"]),
]  # fmt: skip


@pytest.mark.parametrize(("name", "starts"), BAD, ids=[b[0] for b in BAD])
def test_bad_file(name: str, starts: list[str]) -> None:
    with pytest.raises(BadConfig) as exc:
        load(f"bad/{name}")
    problems = [p.removeprefix(str(DATA / "bad") + "/") for p in exc.value.problems]
    assert len(problems) == len(starts), problems
    for line, start in zip(sorted(problems), sorted(starts), strict=True):
        assert line.startswith(start), line


def test_a_missing_file() -> None:
    with pytest.raises(BadConfig) as exc:
        load("no/such.conf")
    assert exc.value.problems[0].endswith("such.conf: cannot read it: No such file or directory")


# -- values -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("", {}),
        ('A="1",B="2"', {"A": "1", "B": "2"}),
        ("KEY=val,KEY2=val2", {"KEY": "val", "KEY2": "val2"}),
        ('PATH="/a:/b",X="with, comma"', {"PATH": "/a:/b", "X": "with, comma"}),
        ('\n    A="x",\n    B=y', {"A": "x", "B": "y"}),
        ("DJANGO_SETTINGS_MODULE=proj.settings", {"DJANGO_SETTINGS_MODULE": "proj.settings"}),
    ],
)
def test_environment_syntax(text: str, env: dict[str, str]) -> None:
    assert environment(text) == env


@pytest.mark.parametrize("text", ["A", 'A="unclosed', 'A="x"B=2'])
def test_bad_environment(text: str) -> None:
    with pytest.raises(ValueError):
        environment(text)


@pytest.mark.parametrize(
    ("argv", "app", "inst"),
    [
        ("celery -A proj worker --loglevel=INFO", {"celery_app": "proj"}, {"loglevel": "INFO"}),
        (
            "/srv/venv/bin/celery --app=x.celery:app worker -Q a,b -c 4 -P threads -l warn",
            {"python": "/srv/venv", "celery_app": "x.celery:app"},
            {"queues": ["a", "b"], "concurrency": 4, "pool": "threads", "loglevel": "WARNING"},
        ),
        (
            "python3 -m celery -A p -b redis://h/0 worker --autoscale=10,3 -Ofair -n w1@%h",
            {"python": "python3", "celery_app": "p", "broker": "redis://h/0"},
            {"autoscale": {"min": 3, "max": 10}, "args": ["-O", "fair"]},
        ),
        (  # Celery 4's order: options after 'worker'
            "celery worker -A celery_tasks --loglevel=INFO --max-tasks-per-child=100",
            {"celery_app": "celery_tasks"},
            {"loglevel": "INFO", "args": ["--max-tasks-per-child=100"]},
        ),
    ],
)
def test_celery_worker_command_lines(argv: str, app: dict[str, Any], inst: dict[str, Any]) -> None:
    worker = worker_of(shlex.split(argv))
    assert worker is not None
    assert worker.app == app and worker.instance == inst


@pytest.mark.parametrize("argv", ["celery -A p beat", "python worker.py", "celery", "flower"])
def test_not_a_celery_worker(argv: str) -> None:
    assert worker_of(shlex.split(argv)) is None


# -- the plan -------------------------------------------------------------------------


def _as_branch_holds(conv: Conversion) -> Existing:
    """What a branch answers once the conversion was applied (as the API shows it)."""
    apps_ = {a.name: {"name": a.name, "env": dict(a.env), **a.celery} for a in conv.apps}
    instances = {
        i.name: {**i.fields, "app": a.name, "startsecs": float(i.fields.get("startsecs", 1))}
        for a in conv.apps
        for i in a.instances
    }
    return Existing(apps_, instances)


def test_plan_creates_then_changes_nothing() -> None:
    conv = load("zulip/conf.d/zulip.conf")
    first = plan(conv, Existing({}, {}))
    assert first.count("app", Action.CREATE) == 3
    assert first.count("instance", Action.CREATE) == 19
    again = plan(conv, _as_branch_holds(conv))
    assert not again.changes_anything and again.problems == ()
    assert again.count("instance", Action.UNCHANGED) == 19


def test_plan_updates_only_what_differs_and_keeps_the_rest() -> None:
    conv = load("zulip/conf.d/zulip.conf")
    held = _as_branch_holds(conv)
    tornado = dict(held.instances["zulip-tornado"], stopwaitsecs=5.0)
    extra = {"app": "zulip-tornado", "name": "mine", "kind": "process"}
    held = Existing(held.apps, {**held.instances, "zulip-tornado": tornado, "mine": extra})
    p = plan(conv, held)
    (step,) = [s for s in p.steps if s.action is not Action.UNCHANGED]
    assert (step.name, dict(step.body)) == ("zulip-tornado", {"stopwaitsecs": 30})
    assert p.kept == (("zulip-tornado", "mine"),)


def test_plan_refuses_a_name_of_another_app_and_a_kind_change() -> None:
    conv = load("celery/celeryd.conf", ImportOptions(celery=True))
    taken = Existing({}, {"celery": {"app": "other", "name": "celery", "kind": "process"}})
    (line,) = plan(conv, taken).problems
    assert "is taken by other/celery" in line and line.startswith(str(DATA))
    kind = Existing({}, {"celery": {"app": "celery", "name": "celery", "kind": "process"}})
    (line,) = plan(conv, kind).problems
    assert "the kind cannot change" in line


def test_plan_compares_a_redacted_broker() -> None:
    conv = load("celery/celeryd.conf", ImportOptions(celery=True, broker="amqp://u:secret@h//"))
    held = _as_branch_holds(conv)
    app = dict(held.apps["celery"], broker="amqp://u:**@h//", embedded_broker=False)
    p = plan(conv, Existing({"celery": app}, held.instances))
    assert not p.changes_anything
