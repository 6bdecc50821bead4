"""The reference docs cannot go stale: every option, command and route is in
them, and their generated parts are what tools/gen_docs.py makes now."""

from __future__ import annotations

import click
import pytest
from branchctl.cli import main as branchctl

from branchd import config
from branchd.api.routes import ROUTES
from branchd.daemon import FLAGS
from tools import gen_docs

HOW = f"regenerate them: {gen_docs.REGENERATE}"


def _part(path: str, name: str) -> str:
    text = (gen_docs.ROOT / path).read_text(encoding="utf-8")
    part = gen_docs.part_of(text, name)
    assert part is not None, f"{path} has no generated part {name!r}; {HOW}"
    return part


@pytest.mark.parametrize("path", sorted(gen_docs.PARTS))
def test_the_generated_parts_are_what_the_code_says_now(path: str) -> None:
    text, new = gen_docs.regenerated(path)
    assert text == new, f"{path} is out of date with the code; {HOW}"


def test_every_option_of_branchd_is_in_the_configuration_reference() -> None:
    part = _part("docs/configuration.md", "options")
    missing = [f.flag for f in FLAGS if f"`{f.flag}`" not in part]
    missing += [v for v in [*config._ENV, "BRANCHD_CONFIG"] if f"`{v}`" not in part]
    missing += [k for k in config._FLAT if f"`{k}`" not in part]
    for section, cls in config._SECTIONS.items():
        for field in cls.__dataclass_fields__:
            if f"`[{section}] {field}`" not in part:
                missing.append(f"[{section}] {field}")
    assert not missing, f"not in docs/configuration.md: {missing}; {HOW}"


def _command_paths(group: click.Command, path: str) -> list[str]:
    found = [path]
    if isinstance(group, click.Group):
        for name, sub in group.commands.items():
            if not sub.hidden:
                found += _command_paths(sub, f"{path} {name}")
    return found


def test_every_branchctl_command_and_option_is_in_the_cli_reference() -> None:
    part = _part("docs/cli.md", "commands")
    paths = _command_paths(branchctl, "branchctl")
    assert len(paths) > 40
    missing = [p for p in paths if f"### {p}\n" not in part + "\n"]
    assert not missing, f"not in docs/cli.md: {missing}; {HOW}"
    # each command's own options, under its own heading
    sections = {s.split("\n", 1)[0]: s for s in ("\n" + part).split("\n### ")[1:]}
    ctx = click.Context(branchctl, info_name="branchctl")
    for command, sub_ctx in gen_docs._commands(branchctl, ctx):
        body = sections[sub_ctx.command_path]
        for param in command.params:
            if isinstance(param, click.Option):
                assert f"`{param.opts[0]}`" in body, (sub_ctx.command_path, param.opts)


def test_every_route_is_in_the_api_reference() -> None:
    part = _part("docs/api.md", "routes")
    missing = [
        f"{r.method} {r.path}" for r in ROUTES if f"| {r.method} | `{r.path}` |" not in part
    ]
    assert not missing, f"not in docs/api.md: {missing}; {HOW}"


@pytest.mark.parametrize(
    ("text", "name", "found"),
    [
        ("a\n<!-- BEGIN GENERATED: x -->\nold\n<!-- END GENERATED: x -->\nb", "x", None),
        (f"a\n{gen_docs.begin('x')}\nold\n{gen_docs.end('x')}\nb", "x", "old"),
        (f"{gen_docs.begin('x')}\n{gen_docs.end('x')}", "y", None),
    ],
)
def test_a_part_is_found_by_its_markers(text: str, name: str, found: str | None) -> None:
    assert gen_docs.part_of(text, name) == found


def test_a_part_is_replaced_and_the_prose_around_it_kept() -> None:
    text = f"intro\n{gen_docs.begin('x')}\nold\n{gen_docs.end('x')}\nafter\n"
    new = gen_docs.with_part(text, "x", "new | row")
    assert new == f"intro\n{gen_docs.begin('x')}\nnew | row\n{gen_docs.end('x')}\nafter\n"
    assert gen_docs.with_part("intro\n", "y", "b").endswith(f"{gen_docs.end('y')}\n")


@pytest.mark.parametrize(
    ("raw", "cell"),
    [("a | b", "a \\| b"), ("two\n  lines", "two lines"), ("", "")],
)
def test_a_table_cell_is_one_line(raw: str, cell: str) -> None:
    assert gen_docs.cell(raw) == cell


def test_the_operations_guide_has_its_sections() -> None:
    text = (gen_docs.ROOT / "docs/operations.md").read_text(encoding="utf-8")
    for heading in (
        "## Upgrade without stopping workers",
        "## Backup",
        "## Running a cluster",
        "## Security model",
        "## Troubleshooting",
    ):
        assert f"\n{heading}" in text, heading
