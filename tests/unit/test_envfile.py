"""The env file parser (``branchd.process.envfile``): systemd's
``EnvironmentFile=`` syntax, line by line, as a table."""

from __future__ import annotations

import pytest

from branchd.process.envfile import parse_env_file

# fmt: off
#: (file text, the variables it gives)
TABLE: list[tuple[str, dict[str, str]]] = [
    ("",                                   {}),
    ("A=1\nB=2\n",                         {"A": "1", "B": "2"}),
    ("A=1",                                {"A": "1"}),  # no final newline
    ("A=",                                 {"A": ""}),
    ("A=\n",                               {"A": ""}),
    ("  A  =  spaced out  \n",             {"A": "spaced out"}),
    ("A=a b\tc\n",                         {"A": "a b\tc"}),
    ("# a comment\n; another\nA=1\n",      {"A": "1"}),
    ("   # indented comment\nA=1\n",       {"A": "1"}),
    ("A=x # not a comment\n",              {"A": "x # not a comment"}),
    ("A=x;y\n",                            {"A": "x;y"}),
    ("# comment \\\nA=1\n",                {"A": "1"}),  # a comment never continues
    ("\n\n\nA=1\n\n",                      {"A": "1"}),
    ("no equals sign\nA=1\n",              {"A": "1"}),
    ("=x\nA=1\n",                         {"A": "1"}),  # no key: a line without "="
    ("A=1\nA=2\n",                         {"A": "2"}),
    ("A=b=c\n",                            {"A": "b=c"}),
    # quotes
    ('A="double quoted"\n',                {"A": "double quoted"}),
    ("A='single quoted'\n",                {"A": "single quoted"}),
    ('A="  kept  "\n',                     {"A": "  kept  "}),
    ("A='$HOME \\n \"x\"'\n",              {"A": '$HOME \\n "x"'}),  # all as is
    ('A="a \\"b\\" \\\\ \\$c \\`d\\`"\n',  {"A": 'a "b" \\ $c `d`'}),
    ('A="\\n\\t"\n',                       {"A": "\\n\\t"}),  # other escapes stay
    ('A="line one\nline two"\n',           {"A": "line one\nline two"}),
    ("A='one\ntwo'\nB=3\n",                {"A": "one\ntwo", "B": "3"}),
    ('A="x"y\n',                           {"A": "xy"}),
    ('A="x" \'y\' z\n',                    {"A": "xyz"}),
    ('A=x"y"\n',                           {"A": 'x"y"'}),  # quotes only open a value
    ('A="unterminated',                    {"A": "unterminated"}),
    # backslashes
    ("A=one\\\ntwo\n",                     {"A": "onetwo"}),
    ("A=one \\\n  two\n",                  {"A": "one   two"}),
    ('A="one \\\ntwo"\n',                  {"A": "one two"}),
    ("A=a\\ \\ \n",                        {"A": "a  "}),  # escaped blanks are kept
    ("A=\\#x\n",                           {"A": "#x"}),
    ("A=c:\\\\dir\n",                      {"A": "c:\\dir"}),
    # export, CRLF
    ("export A=1\n",                       {"A": "1"}),
    ("export\tA=1\n",                      {"A": "1"}),
    ("export=1\n",                         {"export": "1"}),
    ("A=1\r\nB=2\r\n",                     {"A": "1", "B": "2"}),
    ("A=caf\u00e9 \u2603\n",               {"A": "caf\u00e9 \u2603"}),
]
# fmt: on


@pytest.mark.parametrize(("text", "expected"), TABLE, ids=[repr(t)[:40] for t, _ in TABLE])
def test_parse(text: str, expected: dict[str, str]) -> None:
    parsed = parse_env_file(text)
    assert parsed.values == expected
    assert parsed.ignored == ()


# fmt: off
#: (file text, the variables kept, the lines skipped and why)
SKIPPED: list[tuple[str, dict[str, str], tuple[tuple[int, str], ...]]] = [
    ("1A=x\nB=2\n",        {"B": "2"}, ((1, "'1A' is not a variable name"),)),
    ("A B=x\n",            {},         ((1, "'A B' is not a variable name"),)),
    ("A-B=1\nC=2\n",       {"C": "2"}, ((1, "'A-B' is not a variable name"),)),
    ("A=1\nB='x\ny'\nC.D=1\n", {"A": "1", "B": "x\ny"}, ((4, "'C.D' is not a variable name"),)),
    ("A=x\0y\n",           {},         ((1, "the value of A holds a NUL character"),)),
]
# fmt: on


@pytest.mark.parametrize(("text", "values", "ignored"), SKIPPED)
def test_what_cannot_be_an_environment_variable_is_skipped_and_said(
    text: str, values: dict[str, str], ignored: tuple[tuple[int, str], ...]
) -> None:
    parsed = parse_env_file(text)
    assert (parsed.values, parsed.ignored) == (values, ignored)


def test_the_order_is_the_files_and_a_later_assignment_wins() -> None:
    assert list(parse_env_file("B=1\nA=2\nB=3\n").values.items()) == [("A", "2"), ("B", "3")]
