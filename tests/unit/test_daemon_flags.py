"""branchd's own options (branchd/daemon.py's FLAGS, parsed with argparse since
issue 10, part 9): what each gives config.load, as the click command gave it."""

from __future__ import annotations

import pytest

from branchd import __version__
from branchd.config import load
from branchd.daemon import FLAGS, parse_flags
from branchd.errors import ConfigError

NOTHING = {f.key: None for f in FLAGS}


def test_no_option_sets_nothing() -> None:
    assert parse_flags([]) == NOTHING
    assert len(NOTHING) == len(FLAGS) == 20  # (a key twice would hide a flag)


def test_each_kind_of_option() -> None:
    flags = parse_flags(
        [
            "--state-dir", "/tmp/s",
            "--no-auth",
            "--join", "http://127.0.0.1:1",
            "--join=http://127.0.0.1:2",
            "--max-instances", "7",
            "--cluster-profile", "wan",
            "--config", "b.toml",
            "--bind", "127.0.0.1:1",
            "--bind", "127.0.0.1:2",  # the last one, as click
        ]
    )  # fmt: skip
    assert flags == {
        **NOTHING,
        "state_dir": "/tmp/s",
        "no_auth": True,
        "join": ("http://127.0.0.1:1", "http://127.0.0.1:2"),
        "max_instances": 7,
        "cluster_profile": "wan",
        "config": "b.toml",
        "bind": "127.0.0.1:2",
    }


def test_a_value_that_starts_with_a_dash_is_the_options_value() -> None:
    # (argparse alone would take "-abc" for an option; click took it as the value)
    assert parse_flags(["--token", "-abc", "--cluster-key", "--x"])["token"] == "-abc"
    assert parse_flags(["--token", "-abc", "--cluster-key", "--x"])["cluster_key"] == "--x"


@pytest.mark.parametrize(
    "argv",
    [
        ["--bogus"],
        ["--state", "/tmp/s"],  # no abbreviations, as click
        ["--max-instances", "x"],
        ["--cluster-profile", "moon"],
        ["--no-auth=yes"],
        ["--token"],
        ["extra"],
    ],
)
def test_a_usage_error_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_flags(argv)
    assert exited.value.code == 2
    assert "usage: branchd [OPTIONS]" in capsys.readouterr().err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_flags(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"branchd, version {__version__}\n"
    with pytest.raises(SystemExit) as exited:
        parse_flags(["-h"])
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    assert all(f.flag in shown for f in FLAGS)


def test_every_option_is_a_setting_config_load_knows() -> None:
    for f in FLAGS:
        value: object = {"switch": True, "int": 3, "repeat": ("http://127.0.0.1:1",)}.get(
            f.kind, f.choices[0] if f.choices else "x"
        )
        try:
            load({f.key: value}, {})
        except ConfigError as exc:  # a value this test made up; the key is known
            assert "unknown configuration key" not in exc.message, f.flag
