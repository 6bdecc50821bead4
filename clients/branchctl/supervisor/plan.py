"""What an import changes: the converted declarations against what a branch
holds. Only what differs is created or changed, so a second import of the
same file changes nothing; nothing is deleted (an instance of an imported app
that the file no longer has is kept, and said)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from branchctl.supervisor.convert import Conversion, Note


class Action(StrEnum):
    CREATE = "create"
    UPDATE = "update"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Change:
    field: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Step:
    what: str  # "app" or "instance"
    app: str
    name: str
    action: Action
    #: create: the PUT (app) or POST (instance) body; update: the PATCH body.
    body: Mapping[str, Any]
    changes: tuple[Change, ...] = ()
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"what": self.what, "app": self.app, "name": self.name}
        out["action"] = self.action.value
        out["changes"] = [{"field": c.field, "old": c.old, "new": c.new} for c in self.changes]
        out["source"] = self.source
        return out


@dataclass(frozen=True)
class Existing:
    """What the branch holds: apps by name and instances by name (across
    apps), as their one-record answers show them (env values included)."""

    apps: Mapping[str, Mapping[str, Any]]
    instances: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    #: Instances of an imported app that the file does not declare: (app, name).
    kept: tuple[tuple[str, str], ...]
    #: Why it cannot be applied (a name taken by another app...): nothing is.
    problems: tuple[str, ...]
    notes: tuple[Note, ...]

    def count(self, what: str, action: Action) -> int:
        return sum(1 for s in self.steps if s.what == what and s.action is action)

    @property
    def changes_anything(self) -> bool:
        return any(s.action is not Action.UNCHANGED for s in self.steps)


#: ``scheme://user:password@`` in a URL: the daemon answers ``**`` for the
#: password (branchd.views.redact_urls; the client keeps its own copy of the rule).
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s;]*:)(?P<secret>[^@/\s;]+)@")


def redact(text: str) -> str:
    return _PASSWORD.sub(lambda m: f"{m['head']}**@", text) if "@" in text else text


def _same(field: str, old: Any, new: Any) -> bool:
    if isinstance(new, bool) or isinstance(old, bool):
        return old is new
    if isinstance(new, int | float) and isinstance(old, int | float):
        return float(old) == float(new)
    if field in ("command", "broker", "result_backend"):
        if isinstance(new, list) and isinstance(old, list | tuple):
            return list(old) == [redact(a) for a in new]
        if isinstance(new, str):
            return bool(old == redact(new))
    if isinstance(new, list) and isinstance(old, list | tuple):
        return list(old) == new
    if isinstance(new, dict) and isinstance(old, dict):
        return dict(old) == new
    return bool(old == new)


def plan(conv: Conversion, existing: Existing) -> Plan:
    steps: list[Step] = []
    problems: list[str] = []
    kept: list[tuple[str, str]] = []
    for app in conv.apps:
        have = existing.apps.get(app.name)
        if have is None:
            body = {"env": dict(app.env), **app.celery}
            steps.append(Step("app", app.name, app.name, Action.CREATE, body))
        else:
            steps.append(_app_update(app.name, app.env, app.celery, have))
        mine = set()
        for inst in app.instances:
            mine.add(inst.name)
            old = existing.instances.get(inst.name)
            if old is None:
                steps.append(
                    Step(
                        "instance", app.name, inst.name, Action.CREATE, inst.fields, (), inst.source
                    )
                )
                continue
            if old.get("app") != app.name:
                problems.append(
                    f"{inst.source}: instance name {inst.name!r} is taken by "
                    f"{old.get('app')}/{inst.name} (instance names are unique on a branch, "
                    "across apps): rename or remove one"
                )
                continue
            if old.get("kind", "process") != inst.fields.get("kind", "process"):
                problems.append(
                    f"{inst.source}: {app.name}/{inst.name} is a {old.get('kind')} instance, "
                    f"the file makes it a {inst.fields.get('kind')} one; the kind cannot change: "
                    f"remove it first (branchctl instances remove {app.name} {inst.name})"
                )
                continue
            steps.append(_instance_update(app.name, inst.name, inst.fields, old, inst.source))
        kept += sorted(
            (app.name, name)
            for name, rec in existing.instances.items()
            if rec.get("app") == app.name and name not in mine
        )
    return Plan(tuple(steps), tuple(kept), tuple(problems), conv.notes)


def _app_update(
    name: str, env: Mapping[str, str], celery: Mapping[str, Any], have: Mapping[str, Any]
) -> Step:
    changes: list[Change] = []
    body: dict[str, Any] = {}
    old_env = dict(have.get("env") or {})
    env_patch = {k: v for k, v in env.items() if old_env.get(k) != v}
    if env_patch:
        body["env"] = env_patch
        changes += [Change(f"env.{k}", old_env.get(k), v) for k, v in env_patch.items()]
    for key, value in celery.items():
        old = have.get(key)
        if key == "broker" and have.get("embedded_broker"):
            old = None
        if not _same(key, old, value):
            body[key] = value
            changes.append(Change(key, old, redact(value) if isinstance(value, str) else value))
    action = Action.UPDATE if body else Action.UNCHANGED
    return Step("app", name, name, action, body, tuple(changes))


def _instance_update(
    app: str, name: str, fields: Mapping[str, Any], old: Mapping[str, Any], source: str
) -> Step:
    changes: list[Change] = []
    body: dict[str, Any] = {}
    for key, value in fields.items():
        if key in ("name", "kind"):
            continue
        if not _same(key, old.get(key), value):
            body[key] = value
            shown = [redact(a) for a in value] if key == "command" else value
            changes.append(Change(key, old.get(key), shown))
    action = Action.UPDATE if body else Action.UNCHANGED
    return Step("instance", app, name, action, body, tuple(changes), source)
