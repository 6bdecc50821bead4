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


# the cluster section -------------------------------------------------------------------

KEY = "A" * 43 + "="  # base64 of 32 bytes


def test_a_branch_without_key_or_join_is_a_cluster_of_one(tmp_path: Path) -> None:
    cfg = load({"state_dir": str(tmp_path), "bind": "0.0.0.0:8400"}, {})
    assert not cfg.cluster.enabled and cfg.cluster.zeroconf and cfg.cluster.profile == "lan"


def test_cluster_settings_from_flags_environment_and_file(tmp_path: Path) -> None:
    flags = _file(
        tmp_path,
        '[cluster]\nprofile = "wan"\nprobe_interval = 2.5\njoin = ["http://m1:8400"]\n'
        "max_instances = 7\n",
    )
    env = {"BRANCHD_JOIN": "http://m2:8400, http://m3:8400", "BRANCHD_NO_ZEROCONF": "1"}
    cfg = load({**flags, "state_dir": str(tmp_path), "cluster_key": KEY}, env)
    c = cfg.cluster
    assert c.enabled and c.key == KEY and c.profile == "wan" and c.max_instances == 7
    assert c.join == ("http://m2:8400", "http://m3:8400")  # the environment over the file
    assert not c.zeroconf and c.timers() == {"probe_interval": 2.5}
    cfg = load(
        {"state_dir": str(tmp_path), "join": ("http://a:1", "http://b:2"), "gossip": "1.2.3.4:9"},
        {"BRANCHD_MAX_INSTANCES": "12", "BRANCHD_CLUSTER_PROFILE": "local"},
    )
    assert cfg.cluster.join == ("http://a:1", "http://b:2") and cfg.cluster.gossip == "1.2.3.4:9"
    assert cfg.cluster.max_instances == 12 and cfg.cluster.profile == "local"


def test_the_cluster_key_file_is_read(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    cfg = load({"state_dir": str(tmp_path), "cluster_key_file": str(key_file)}, {})
    assert cfg.cluster.key == KEY and cfg.cluster.enabled


@pytest.mark.parametrize(
    ("flags", "error"),
    [
        ({"bind": "0.0.0.0:8400", "join": ("http://m1:8400",)}, "without a cluster key"),
        ({"join": ("m1:8400",)}, "join URL must be http://HOST:PORT"),
        ({"join": ("http://m1:x",)}, "join URL"),
        ({"cluster_profile": "moon"}, "unknown cluster profile 'moon'"),
        ({"gossip": "nohost"}, "gossip must be HOST:PORT"),
        ({"advertise": "h:99999"}, "advertise port out of range"),
        ({"max_instances": 0}, "max_instances must be 1 or more"),
        ({"cluster_key": KEY, "cluster_key_file": "/x"}, "not both"),
        ({"cluster_key_file": "/nonexistent/key"}, "cannot read cluster key file"),
    ],
)
def test_bad_cluster_settings_are_one_clear_error(
    tmp_path: Path, flags: dict[str, object], error: str
) -> None:
    with pytest.raises(ConfigError, match=error):
        load({"state_dir": str(tmp_path), **flags}, {})


def test_bad_cluster_settings_in_the_file(tmp_path: Path) -> None:
    for text, error in [
        ("[cluster]\njoin = 3\n", "must be a list of text"),
        ("[cluster]\nprobe_interval = 'x'\n", "must be a number"),
        ("[cluster]\nbogus = 1\n", "unknown setting"),
        ("[cluster]\nzeroconf = 'no'\n", "must be true or false"),
    ]:
        with pytest.raises(ConfigError, match=error):
            load({**_file(tmp_path, text), "state_dir": str(tmp_path)}, {})


def test_cgroups_are_on_unless_turned_off(tmp_path: Path) -> None:
    base = {"state_dir": str(tmp_path)}
    assert load(base, {}).supervision.cgroups is True
    for text in ("cgroups = false\n", "[supervision]\ncgroups = false\n"):
        assert load({**_file(tmp_path, text), **base}, {}).supervision.cgroups is False
    with pytest.raises(ConfigError, match="cgroups"):
        load({**_file(tmp_path, 'cgroups = "no"\n'), **base}, {})
