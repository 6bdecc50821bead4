"""Configuration: a tree of frozen sections, from file < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from branchd.config import ApiSection, CelerySection, Config, load
from branchd.errors import ConfigError


def _file(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "branchd.toml"
    path.write_text(text)
    return {"config": str(path)}


def test_flat_keys_and_section_tables_fill_the_sections(tmp_path: Path) -> None:
    flags = _file(
        tmp_path,
        'health_interval = 0.5\nbackoff_base = 0.2\nlog_check_interval = 1.0\n'
        '[celery]\nreconcile_interval = 7.0\n[api]\nmax_body = 2048\n',
    )
    cfg = load({**flags, "bind": "127.0.0.1:9000", "state_dir": str(tmp_path)}, {})
    assert cfg.celery == CelerySection(health_interval=0.5, reconcile_interval=7.0)
    assert cfg.api == ApiSection(host="127.0.0.1", port=9000, max_body=2048)
    assert cfg.supervision.backoff_base == 0.2 and cfg.logs.check_interval == 1.0
    assert cfg.state_dir == tmp_path


def test_environment_between_file_and_flags(tmp_path: Path) -> None:
    flags = _file(tmp_path, 'token = "from-file"\nlog_level = "debug"\n')
    env = {"BRANCHD_TOKEN": "from-env", "BRANCHD_STATE_DIR": str(tmp_path)}
    cfg = load({**flags, "token": None}, env)
    assert (cfg.api.token, cfg.log_level) == ("from-env", "DEBUG")
    assert load({**flags, "token": "from-flag"}, env).api.token == "from-flag"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("nope = 1\n", "unknown configuration key(s): nope"),
        ("[celery]\nnope = 1\n", "nope"),
        ('celery = "fast"\n', "[celery] must be a table"),
        ('bind = "0.0.0.0:8400"\nno_auth = true\n', "without a token"),
        ('no_auth = "maybe"\n', "no_auth must be true or false"),
        ('no_auth = true\ntoken = "t"\n', "--no-auth and a token"),
        ('token = "t"\ntoken_file = "/x"\n', "not both"),
        ('token_file = "/nonexistent/token"\n', "cannot read token file"),
        ("listings_at_once = -1\n", "api.listings_at_once must be a number of 0 or more"),
        # wrong types are refused at start, not at their first use
        ('[api]\nmax_body = "x"\n', "api.max_body must be a number of 0 or more, got 'x'"),
        ('backoff_base = "abc"\n', "supervision.backoff_base must be a number"),
        ("max_body = 1.5\n", "api.max_body must be a whole number"),
        ("[api]\nauth = 1\n", "api.auth must be true or false"),
        ('no_auth = "yes"\n', "no_auth must be true or false, got 'yes'"),
        ("[api]\nnope = 1\n", "unknown setting(s) in [api]: nope"),
        ("[supervision]\nkill = 1\n", "unknown setting(s) in [supervision]: kill"),
    ],
)
def test_bad_configuration_is_one_clear_error(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load({**_file(tmp_path, text), "state_dir": str(tmp_path)}, {})
    assert error in raised.value.message


def test_presets() -> None:
    fast = Config.for_tests(Path("/x"))
    assert fast.api.port == 0 and fast.supervision.backoff_base < 1.0
    assert Config(Path("/x")).celery.health_interval == 5.0


def test_auth_is_on_unless_turned_off(tmp_path: Path) -> None:
    base = {"state_dir": str(tmp_path)}
    assert load(base, {}).api.auth is True
    # a non-loopback bind no longer needs a given token: the daemon makes one
    assert load({**base, "bind": "0.0.0.0:8400"}, {}).api.auth is True
    assert load({**base, "no_auth": True}, {}).api.auth is False
    assert load(base, {"BRANCHD_NO_AUTH": "1"}).api.auth is False
    assert load(base, {"BRANCHD_NO_AUTH": "0"}).api.auth is True
    assert load({**_file(tmp_path, "[api]\nauth = false\n"), **base}, {}).api.auth is False


def test_the_token_file_is_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("  abc123\n")
    cfg = load({"state_dir": str(tmp_path), "token_file": str(secret)}, {})
    assert (cfg.api.token, cfg.api.token_file) == ("abc123", secret)
    cfg = load({"state_dir": str(tmp_path)}, {"BRANCHD_TOKEN_FILE": str(secret)})
    assert cfg.api.token == "abc123"
    assert cfg.token_path == tmp_path / "token"
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load({"state_dir": str(tmp_path), "token_file": str(secret)}, {})
