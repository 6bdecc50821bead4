"""Writes the generated parts of the reference docs from the code itself, so
they cannot go stale (tests/unit/test_reference_docs.py fails when they do):

- docs/configuration.md: every setting, from branchd/config.py (its sections,
  flat keys and environment) and branchd's options (branchd/daemon.py's FLAGS);
- docs/cli.md: every branchctl command, from its click tree;
- docs/api.md: the route reference, from the OpenAPI document.

Each part sits between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END
GENERATED: name -->``; the prose around it is kept.

    .venv/bin/python tools/gen_docs.py           # rewrite the parts
    .venv/bin/python tools/gen_docs.py --check   # exit 1 when one is out of date
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click
from branchctl.cli import main as branchctl

from branchd import config
from branchd.api import openapi
from branchd.api.routes import ROUTES
from branchd.daemon import FLAGS, Flag

ROOT = Path(__file__).resolve().parent.parent
REGENERATE = ".venv/bin/python tools/gen_docs.py"

# -- the parts between markers ----------------------------------------------


def begin(name: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} (by tools/gen_docs.py; edit the code, not this) -->"


def end(name: str) -> str:
    return f"<!-- END GENERATED: {name} -->"


def part_of(text: str, name: str) -> str | None:
    """The generated part ``name`` of a document (None: it has no such part)."""
    start, stop = text.find(begin(name)), text.find(end(name))
    if start < 0 or stop < start:
        return None
    return text[start + len(begin(name)) : stop].strip("\n")


def with_part(text: str, name: str, body: str) -> str:
    """``text`` with its part ``name`` replaced (appended when it has none)."""
    block = f"{begin(name)}\n{body}\n{end(name)}"
    start, stop = text.find(begin(name)), text.find(end(name))
    if start < 0 or stop < start:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    return text[:start] + block + text[stop + len(end(name)) :]


def cell(text: str) -> str:
    """Text for one table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- docs/configuration.md --------------------------------------------------

#: Flag keys that load() turns into settings by hand (not through _FLAT).
_SPECIAL = {
    "bind": ("api.host", "api.port"),
    "no_auth": ("api.auth",),
    "no_zeroconf": ("cluster.zeroconf",),
}
#: The top-level keys, no section's: key -> (default, what it is).
_TOP = {
    "state_dir": ("$XDG_STATE_HOME/branchd, else ~/.local/state/branchd", ""),
    "log_level": ("INFO", ""),
    "config": ("none", "The TOML file to read (flag and environment only)"),
}


def _doc_comments(cls: type[Any]) -> dict[str, str]:
    """Each field's ``#:`` comment in the class's source; one comment over
    fields with no blank line between them is theirs all."""
    found: dict[str, str] = {}
    pending: list[str] = []
    after_field = False
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        match = re.match(r"(\w+)\s*:", stripped)
        if stripped.startswith("#:"):
            pending = [*([] if after_field else pending), stripped[2:].strip()]
            after_field = False
        elif match and not stripped.startswith(("def ", "class ")):
            if pending:
                found[match.group(1)] = " ".join(pending).replace("``", "`")
            after_field = True
        elif not stripped.startswith("#"):
            pending, after_field = [], False
    return found


def _default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[]" if not value else "[" + ", ".join(map(repr, value)) + "]"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _help(option: Flag | None) -> str:
    """An option's help, without the ``[env ...; default ...]`` the table shows."""
    if option is None or not option.help:
        return ""
    return re.sub(r"\s*\[env [^\]]*\]", "", option.help).strip()


def config_rows() -> list[list[str]]:
    """One row per setting: the TOML key, flag, environment, default, what it is."""
    options = {f.key: f for f in FLAGS}
    env_of: dict[str, list[str]] = {}
    for var, key in config._ENV.items():
        env_of.setdefault(key, []).append(var)
    env_of.setdefault("config", []).append("BRANCHD_CONFIG")
    keys_of: dict[str, list[str]] = {}  # "section.field" -> the flag keys that set it
    for key, (section, name) in config._FLAT.items():
        keys_of.setdefault(f"{section}.{name}", []).append(key)
    for key, targets in _SPECIAL.items():
        for target in targets:
            keys_of.setdefault(target, []).append(key)

    def flags(keys: list[str]) -> str:
        return ", ".join(f"`{o.flag}`" for k in keys if (o := options.get(k)) is not None)

    def envs(keys: list[str]) -> str:
        return ", ".join(f"`{v}`" for k in keys for v in env_of.get(k, ()))

    rows: list[list[str]] = []
    used: set[str] = set()
    for key, (default, what) in _TOP.items():
        toml = "" if key == "config" else f"`{key}`"
        rows.append([toml, flags([key]), envs([key]), default, what or _help(options.get(key))])
        used.add(key)
    for section, cls in config._SECTIONS.items():
        comments = _doc_comments(cls)
        for f in fields(cls):
            keys = keys_of.get(f"{section}.{f.name}", [])
            used.update(keys)
            flat = [k for k in keys if k in config._FLAT or k in _SPECIAL]
            toml = f"`[{section}] {f.name}`" + "".join(f", `{k}`" for k in flat)
            value: Any = f.default if f.default is not MISSING else None
            what = comments.get(f.name) or next(
                (h for k in keys if (h := _help(options.get(k)))), ""
            )
            rows.append([toml, flags(keys), envs(keys), _default(value), what])
    # an option or variable no setting above names still has its row
    for key in sorted((set(options) | set(env_of)) - used):
        rows.append(["", flags([key]), envs([key]), "", _help(options.get(key))])
    return rows


def configuration_part() -> str:
    return table(["TOML key", "flag", "environment", "default", "what it is"], config_rows())


# -- docs/cli.md ------------------------------------------------------------


def _commands(
    group: click.Command, ctx: click.Context
) -> list[tuple[click.Command, click.Context]]:
    found = [(group, ctx)]
    if isinstance(group, click.Group):
        for name in sorted(group.list_commands(ctx)):
            sub = group.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            # (with the command's own settings, as click's make_context: else a
            # command's help option depends on whether a test invoked it before)
            found += _commands(
                sub, click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
            )
    return found


def cli_commands() -> list[str]:
    """Every branchctl command path (``branchctl apps create``), the root first."""
    ctx = click.Context(branchctl, info_name="branchctl")
    return [c.command_path for _, c in _commands(branchctl, ctx)]


def _option_row(param: click.Parameter, ctx: click.Context) -> list[str]:
    if isinstance(param, click.Argument):
        return [f"`{param.human_readable_name}`", "argument", ""]
    assert isinstance(param, click.Option)
    names = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
    kind = "flag" if param.is_flag else param.type.name.lower()
    if isinstance(param.type, click.Choice):
        kind = "|".join(map(str, param.type.choices))
    help_text = param.help or ""
    if param.envvar and isinstance(param.envvar, str):
        help_text += f" [env {param.envvar}]"
    if param.show_default and param.default not in (None, False):
        help_text += f" [default {param.default}]"
    if param.multiple:
        kind += ", repeatable"
    return [names, kind, help_text]


def cli_part() -> str:
    root = click.Context(branchctl, info_name="branchctl", **branchctl.context_settings)
    out: list[str] = []
    for command, ctx in _commands(branchctl, root):
        usage = " ".join([ctx.command_path, *command.collect_usage_pieces(ctx)])
        out.append(f"### {ctx.command_path}\n")
        out.append(f"```\n{usage}\n```\n")
        text = inspect.cleandoc(command.help or "")
        if text:
            out.append(text.split("\n\n")[0].replace("\n", " ").replace("\b ", "") + "\n")
        rows = [
            _option_row(p, ctx)
            for p in command.get_params(ctx)
            if not (isinstance(p, click.Option) and p.name == "help")
        ]
        if rows:
            out.append(table(["option", "takes", "what it does"], rows) + "\n")
    return "\n".join(out).rstrip("\n")


# -- docs/api.md ------------------------------------------------------------


def api_operations() -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) of the OpenAPI document, in its order."""
    doc = openapi.build(ROUTES)
    return [
        (method.upper(), path, op)
        for path, item in doc["paths"].items()
        for method, op in item.items()
    ]


def api_part() -> str:
    rows = []
    for method, path, op in api_operations():
        query = ", ".join(f"`{p['name']}`" for p in op.get("parameters", ()) if p["in"] == "query")
        ok = ", ".join(c for c in op["responses"] if c.startswith("2"))
        body = "JSON" if "application/json" in op.get("requestBody", {}).get("content", {}) else ""
        if "application/octet-stream" in op.get("requestBody", {}).get("content", {}):
            body = "sealed bytes"
        token = "yes" if op.get("security") else "no"
        rows.append([method, f"`{path}`", query, body, ok, token, op["summary"]])
    return table(["method", "path", "query", "body", "success", "token", "what it does"], rows)


# -- the files --------------------------------------------------------------

PARTS = {
    "docs/configuration.md": (("options", configuration_part),),
    "docs/cli.md": (("commands", cli_part),),
    "docs/api.md": (("routes", api_part),),
}


def regenerated(path: str) -> tuple[str, str]:
    """(the file as it is, the file with its parts generated now)."""
    file = ROOT / path
    text = file.read_text(encoding="utf-8") if file.exists() else f"# {file.stem}\n"
    new = text
    for name, make in PARTS[path]:
        new = with_part(new, name, make())
    return text, new


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for path in PARTS:
        text, new = regenerated(path)
        if new != text:
            stale.append(path)
            if not check:
                (ROOT / path).write_text(new, encoding="utf-8")
    if check and stale:
        print(f"out of date: {', '.join(stale)}; run {REGENERATE}", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
