"""supervisord's config files as sections of values that keep their file:line.

supervisord reads its files with Python's RawConfigParser set up so:
``key = value`` or ``key: value`` (keys case-insensitive), full-line comments
with ``;`` or ``#``, inline comments only after whitespace (``a=b ;c``),
indented lines continue the value above, a section seen twice is merged (the
later value wins). configparser forgets where a value came from, so this
reads the same syntax line by line. ``%(here)s`` is the folder of the file a
value was read from (an included file has its own).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


class Reader(Protocol):
    """Where the files come from (the disk, or a test's dict)."""

    def read(self, path: str) -> str:
        """The text of ``path``; OSError when it cannot be read."""
        ...

    def glob(self, pattern: str) -> list[str]:
        """The paths ``pattern`` matches, in any order."""
        ...


class DiskReader:
    def read(self, path: str) -> str:
        return Path(path).read_text(encoding="utf-8")

    def glob(self, pattern: str) -> list[str]:
        return glob.glob(pattern)


@dataclass(frozen=True)
class Where:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Value:
    text: str
    where: Where
    #: The folder of the file it was read from: its ``%(here)s``.
    here: str


@dataclass(frozen=True)
class Section:
    name: str
    where: Where
    options: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class Loaded:
    """The sections of a file and its includes, in the order first seen."""

    sections: tuple[Section, ...]
    #: The folder of the main file (``%(here)s`` outside any value).
    here: str
    #: What was read but has no effect (an include that matched nothing...).
    notes: tuple[tuple[Where, str], ...] = ()


_HEADER = re.compile(r"^\[(?P<name>[^]]+)\]$")
_OPTION = re.compile(r"^(?P<key>[^=:\s][^=:]*?)\s*[=:]\s*(?P<value>.*)$")
_INLINE_COMMENT = re.compile(r"\s[;#]")


def _strip_comment(line: str) -> str:
    match = _INLINE_COMMENT.search(line)
    return (line[: match.start()] if match else line).rstrip()


def parse(text: str, file: str, problems: list[str]) -> list[Section]:
    """The sections of one file (a repeated one appears twice: ``merge`` joins
    them); a line it cannot read is a problem, ``file:line: why``."""
    here = os.path.dirname(os.path.abspath(file))
    sections: list[tuple[str, Where, dict[str, Value]]] = []
    key: str | None = None  # the option a continuation line extends
    key_indent = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        where = Where(file, number)
        stripped = raw.strip()
        if not stripped or stripped[0] in ";#":
            continue  # (a blank line does not end a value: an indented line may follow)
        indent = len(raw) - len(raw.lstrip())
        line = _strip_comment(stripped)
        if key is not None and indent > key_indent and sections:
            options = sections[-1][2]
            old = options[key]
            joined = f"{old.text}\n{line}" if old.text else line
            options[key] = Value(joined, old.where, here)
            continue
        header = _HEADER.match(line)
        if header:
            sections.append((header["name"].strip(), where, {}))
            key = None
            continue
        if not sections:
            problems.append(f"{where}: {stripped!r} comes before any [section] header")
            continue
        option = _OPTION.match(line)
        if option is None:
            problems.append(f"{where}: cannot read {stripped!r}: expected 'key = value'")
            key = None
            continue
        key, key_indent = option["key"].strip().lower(), indent
        sections[-1][2][key] = Value(option["value"].strip(), where, here)
    return [Section(name, where, options) for name, where, options in sections]


def merge(sections: list[Section]) -> list[Section]:
    """Sections of one name made one, as supervisord's parser does (first
    place kept, later values win)."""
    out: dict[str, Section] = {}
    for s in sections:
        old = out.get(s.name)
        out[s.name] = s if old is None else Section(s.name, old.where, {**old.options, **s.options})
    return list(out.values())


def load(
    path: str, reader: Reader, expansions: Mapping[str, object], problems: list[str]
) -> Loaded:
    """``path`` and the files its ``[include] files`` name (globs relative to
    it, whitespace-separated, expanded with ``here``, ``host_node_name`` and
    ``ENV_*``; included files cannot include again, as in supervisord)."""
    here = os.path.dirname(os.path.abspath(path))
    try:
        text = reader.read(path)
    except OSError as exc:
        problems.append(f"{path}: cannot read it: {exc.strerror or exc}")
        return Loaded((), here)
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
        return Loaded((), here)
    main = parse(text, path, problems)
    sections = list(main)
    notes: list[tuple[Where, str]] = []
    include = next((s for s in merge(main) if s.name == "include"), None)
    if include is not None:
        files = include.options.get("files")
        if files is None:
            problems.append(
                f"{include.where}: [include] has no 'files' setting (supervisord refuses it too)"
            )
        else:
            names = {**expansions, "here": files.here}
            patterns = expand(files, names, "[include] files", problems) or ""
            for pattern in patterns.split():
                full = os.path.normpath(os.path.join(here, pattern))
                matches = sorted(reader.glob(full))
                if not matches:
                    notes.append((files.where, f"[include] {pattern!r}: no file matches {full}"))
                for name in matches:
                    sub = load_one(name, reader, problems)
                    for s in sub:
                        if s.name == "include":
                            notes.append(
                                (
                                    s.where,
                                    "[include] in an included file: not read "
                                    "(supervisord does not include from includes)",
                                )
                            )
                    sections += [s for s in sub if s.name != "include"]
    return Loaded(tuple(merge(sections)), here, tuple(notes))


def load_one(path: str, reader: Reader, problems: list[str]) -> list[Section]:
    try:
        return parse(reader.read(path), path, problems)
    except OSError as exc:
        problems.append(f"{path}: cannot read it: {exc.strerror or exc}")
    except UnicodeDecodeError as exc:
        problems.append(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})")
    return []


_NAME = re.compile(r"%\((?P<name>[^)]*)\)")


def expand(value: Value, names: Mapping[str, object], what: str, problems: list[str]) -> str | None:
    """``value`` with supervisord's ``%(name)s`` / ``%(name)d`` / ``%(name)02d``
    expanded (Python's ``%`` formatting, as supervisord does; ``%%`` is a
    literal ``%``); None and a problem when a name is unknown or a ``%`` bad."""
    try:
        return value.text % {**names, "here": value.here}
    except KeyError:
        unknown = [m["name"] for m in _NAME.finditer(value.text) if m["name"] not in names]
        name = unknown[0] if unknown else "?"
        known = ", ".join(sorted({"here", *(n for n in names if not n.startswith("ENV_"))}))
        hint = " (not in the environment)" if name.startswith("ENV_") else f"; known: {known}"
        problems.append(f"{value.where}: {what}: unknown expansion %({name})s{hint}")
    except (ValueError, TypeError) as exc:
        problems.append(f"{value.where}: {what}: bad '%' ({exc}); write %% for a literal %")
    return None
