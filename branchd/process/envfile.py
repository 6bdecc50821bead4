"""Pure: the text of an environment file → variables, in systemd's
``EnvironmentFile=`` syntax (supervisord users asked for env files for years,
Supervisor/supervisor#242; systemd's syntax is the one their files already
have).

The rules, as systemd's own parser applies them:

- one ``KEY=VALUE`` a line; blank lines are skipped; a line whose first
  non-blank character is ``#`` or ``;`` is a comment (a ``#`` later in a
  line is part of the value);
- blanks around the key and around an unquoted value are dropped;
- ``'...'`` keeps everything up to the next ``'`` as it is, newlines too;
  ``"..."`` likewise, but a backslash there escapes ``"``, ``\\``, `` ` ``
  and ``$`` (before anything else it stays) and a backslash-newline is
  dropped; quoted and unquoted parts run together (``A="x"y`` is ``xy``);
- in an unquoted value a backslash takes the next character as it is, and a
  backslash at the end of a line continues the value on the next one;
- a line without ``=`` is skipped, as systemd skips it.

Beyond systemd: an ``export `` before the key is tolerated (files shared with
a shell have it). A key that is not a variable name (letters, digits and
``_``, not starting with a digit) or a value holding a NUL cannot be passed
to a process: the line is skipped and said so in ``ignored``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BLANK = " \t\r\f\v"
#: What a backslash escapes inside double quotes (the shell's set).
_DQ_ESCAPED = '"\\`$'
_EXPORT = re.compile(r"export[ \t]+")


@dataclass(frozen=True)
class EnvFile:
    """What a file gave: the variables in order, and the lines skipped."""

    values: dict[str, str] = field(default_factory=dict)
    #: (line number, why) of each assignment that was skipped.
    ignored: tuple[tuple[int, str], ...] = ()


class _At(Enum):
    PRE_KEY = 1
    KEY = 2
    PRE_VALUE = 3
    VALUE = 4
    VALUE_ESCAPE = 5
    SINGLE = 6
    DOUBLE = 7
    DOUBLE_ESCAPE = 8
    COMMENT = 9


def parse_env_file(text: str) -> EnvFile:
    """The variables ``text`` assigns (a later assignment wins)."""
    values: dict[str, str] = {}
    ignored: list[tuple[int, str]] = []
    at = _At.PRE_KEY
    key: list[str] = []
    value: list[str] = []
    line = 1  # where the current line is
    start = 1  # where the current assignment began (a value may span lines)
    #: Length of ``value`` before its trailing blanks (None: none trail).
    blanks_from: int | None = None

    def push() -> None:
        name = "".join(key).rstrip(_BLANK)
        exported = _EXPORT.match(name)
        if exported and name[exported.end() :]:
            name = name[exported.end() :]
        text = "".join(value)
        if not _NAME.fullmatch(name):
            ignored.append((start, f"{name!r} is not a variable name"))
        elif "\0" in text:
            ignored.append((start, f"the value of {name} holds a NUL character"))
        else:
            values.pop(name, None)  # (a later assignment also moves to the end)
            values[name] = text

    for c in text:
        if at is _At.PRE_KEY:
            if c in "#;":
                at = _At.COMMENT
            elif c == "\n":
                line += 1
            elif c not in _BLANK:
                at, key, value, start = _At.KEY, [c], [], line
        elif at is _At.KEY:
            if c == "\n":
                at = _At.PRE_KEY  # no "=": not an assignment
                line += 1
            elif c == "=":
                at, blanks_from = _At.PRE_VALUE, None
            else:
                key.append(c)
        elif at is _At.PRE_VALUE:
            if c == "\n":
                push()
                at = _At.PRE_KEY
                line += 1
            elif c == "'":
                at = _At.SINGLE
            elif c == '"':
                at = _At.DOUBLE
            elif c == "\\":
                at = _At.VALUE_ESCAPE
            elif c not in _BLANK:
                at = _At.VALUE
                value.append(c)
        elif at is _At.VALUE:
            if c == "\n":
                if blanks_from is not None:
                    del value[blanks_from:]
                push()
                at, blanks_from = _At.PRE_KEY, None
                line += 1
            elif c == "\\":
                at, blanks_from = _At.VALUE_ESCAPE, None
            else:
                if c not in _BLANK:
                    blanks_from = None
                elif blanks_from is None:
                    blanks_from = len(value)
                value.append(c)
        elif at is _At.VALUE_ESCAPE:
            at = _At.VALUE
            if c == "\n":  # a continuation: the newline goes
                line += 1
            else:
                value.append(c)
        elif at is _At.SINGLE:
            if c == "'":
                at = _At.PRE_VALUE
            else:
                line += c == "\n"
                value.append(c)
        elif at is _At.DOUBLE:
            if c == '"':
                at = _At.PRE_VALUE
            elif c == "\\":
                at = _At.DOUBLE_ESCAPE
            else:
                line += c == "\n"
                value.append(c)
        elif at is _At.DOUBLE_ESCAPE:
            at = _At.DOUBLE
            if c in _DQ_ESCAPED:
                value.append(c)
            elif c == "\n":
                line += 1
            else:
                value.extend(("\\", c))
        elif at is _At.COMMENT and c == "\n":
            # (a comment never continues: systemd stopped that in v254)
            at = _At.PRE_KEY
            line += 1
    if at is _At.VALUE and blanks_from is not None:
        del value[blanks_from:]
    if at not in (_At.PRE_KEY, _At.KEY, _At.COMMENT):  # the last line had no newline
        push()
    return EnvFile(values, tuple(ignored))
