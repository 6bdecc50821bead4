"""branchctl import: a supervisord config into apps and instances (see
docs/migrating-from-supervisord.md). The file is converted and the whole
plan made before anything is sent; then only what differs is created or
changed, so importing again after an edit is supervisorctl's reread + update."""

from __future__ import annotations

import os
import platform
from typing import Any

import click

from branchctl.cli.common import Failed, Options, _emit
from branchctl.cli.root import main
from branchctl.client import Client
from branchctl.errors import ApiError, BadConfig
from branchctl.supervisor.convert import Conversion, ImportOptions, NoteKind, convert
from branchctl.supervisor.ini import DiskReader
from branchctl.supervisor.plan import Action, Existing, Plan, Step, plan


@main.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the plan and change nothing.")
@click.option(
    "--celery",
    is_flag=True,
    help="Make each Celery worker program a celery instance (queues, concurrency and "
    "autoscale read from its command); without it, a plain process.",
)
@click.option(
    "--broker",
    metavar="URL",
    help="The broker of the apps of Celery workers whose command and environment name none "
    "[default: branchd's embedded broker].",
)
def import_config(
    opts: Options, file: str, dry_run: bool, celery: bool, broker: str | None
) -> None:
    """Import a supervisord config FILE (with its [include] files): each
    [group:g] becomes app g, a program in no group an app of its own name,
    each process of a program an instance. What cannot be converted is listed
    with the reason. Nothing is deleted."""
    options = ImportOptions(
        celery=celery, broker=broker, environ=dict(os.environ), host=platform.node()
    )
    try:
        conv = convert(file, DiskReader(), options)
    except BadConfig as exc:
        for line in exc.problems:
            click.echo(f"branchctl: {line}", err=True)
        raise click.exceptions.Exit(1) from None
    with opts.client() as c:
        the_plan = plan(conv, _existing(c, conv))
        if the_plan.problems:
            for line in the_plan.problems:
                click.echo(f"branchctl: {line}", err=True)
            raise click.exceptions.Exit(1)
        done = 0
        if not dry_run:
            for step in the_plan.steps:
                try:
                    _apply(c, step)
                except ApiError as exc:
                    raise Failed(
                        f"{step.what} {step.app}/{step.name} ({step.action.value}): {exc}; "
                        f"{done} step(s) before it were applied, the rest were not "
                        "(import again once fixed)"
                    ) from exc
                if step.action is not Action.UNCHANGED:
                    done += 1
    _emit(opts, _plan_json(the_plan, dry_run), _plan_text(the_plan, dry_run))


def _existing(c: Client, conv: Conversion) -> Existing:
    """The apps the file names and every instance of the branch (names are
    unique across apps), each as its own answer shows it (env values: a
    listing hides them)."""
    names = {a.name for a in conv.apps}
    apps = {a.name: dict(c.get_app(a.name).raw) for a in c.apps() if a.name in names}
    wanted = {i.name for a in conv.apps for i in a.instances}
    instances: dict[str, dict[str, Any]] = {}
    for inst in c.instances():
        full = c.get_instance(inst.app, inst.name) if inst.name in wanted else inst
        instances[inst.name] = dict(full.raw)
    return Existing(apps, instances)


def _apply(c: Client, step: Step) -> None:
    body = dict(step.body)
    if step.action is Action.UNCHANGED:
        return
    if step.what == "app":
        if step.action is Action.CREATE:
            env = body.pop("env", None)
            c.put_app(step.app, env=env, **body)
        else:
            c.patch_app(step.app, body)
    elif step.action is Action.CREATE:
        c.add_instance(step.app, **body)
    else:
        c.update_instance(step.app, step.name, **body)


def _changes(step: Step) -> str:
    return ", ".join(f"{ch.field}: {_short(ch.old)} -> {_short(ch.new)}" for ch in step.changes)


def _short(value: Any) -> str:
    text = " ".join(value) if isinstance(value, list) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plan_text(p: Plan, dry_run: bool) -> str:
    lines: list[str] = []
    for step in p.steps:
        verb = step.action.value
        detail = f" ({_changes(step)})" if step.action is Action.UPDATE else ""
        if step.what == "app":
            lines.append(f"app {step.app}: {verb}{detail}")
        else:
            kind = step.body.get("kind", "")
            kind_text = f" [{kind}]" if step.action is Action.CREATE else ""
            lines.append(f"  instance {step.name}: {verb}{kind_text}{detail}")
    for app, name in p.kept:
        lines.append(f"  instance {name} of app {app}: not in the file, kept")
    dropped = [n for n in p.notes if n.kind is NoteKind.NOT_CONVERTED]
    notes = [n for n in p.notes if n.kind is NoteKind.NOTE]
    if dropped:
        lines.append(f"not converted ({len(dropped)}):")
        lines += [f"  {n}" for n in dropped]
    if notes:
        lines.append(f"notes ({len(notes)}):")
        lines += [f"  {n}" for n in notes]
    counts = ", ".join(
        f"{what}s: {p.count(what, Action.CREATE)} {'to create' if dry_run else 'created'}, "
        f"{p.count(what, Action.UPDATE)} {'to update' if dry_run else 'updated'}, "
        f"{p.count(what, Action.UNCHANGED)} unchanged"
        for what in ("app", "instance")
    )
    lines.append(counts + ("; dry run: nothing was changed" if dry_run else ""))
    return "\n".join(lines)


def _plan_json(p: Plan, dry_run: bool) -> dict[str, Any]:
    return {
        "dry_run": dry_run,
        "steps": [s.to_json() for s in p.steps],
        "kept": [{"app": a, "name": n} for a, n in p.kept],
        "not_converted": [
            {"where": n.where, "subject": n.subject, "why": n.why}
            for n in p.notes
            if n.kind is NoteKind.NOT_CONVERTED
        ],
        "notes": [
            {"where": n.where, "subject": n.subject, "why": n.why}
            for n in p.notes
            if n.kind is NoteKind.NOTE
        ],
    }
