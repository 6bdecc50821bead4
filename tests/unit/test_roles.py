"""Issue 17, part 4: which role each route needs, who a token is, and the
token file of named tokens (pure: no daemon)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from branchd.api.roles import ROLES, TokenBook, missing, refusal, role_needed
from branchd.api.routes import ROUTES
from branchd.config import NamedToken, Role, is_token_table, load, parse_token_table
from branchd.errors import ConfigError


def test_every_route_has_a_role_decided_and_none_is_stale() -> None:
    routes = [(r.method, r.path) for r in ROUTES]
    assert missing(routes) == [], "add these routes to branchd/api/roles.py ROLES"
    assert sorted(set(ROLES) - set(routes)) == [], "routes gone from ROUTES"


@pytest.mark.parametrize(
    ("method", "template", "role"),
    [
        ("GET", "/v1/ping", None),
        ("GET", "/v1/apps/{app}/instances/{name}/logs", Role.READ),
        ("POST", "/v1/apps/{app}/instances/{name}/stop", Role.OPERATE),
        ("POST", "/v1/apps/{app}/restart", Role.OPERATE),
        ("PUT", "/v1/apps/{app}/instances/{name}/queues/{queue}", Role.OPERATE),
        ("PUT", "/v1/apps/{app}/instances/{name}/autoscale", Role.OPERATE),
        ("POST", "/v1/logs/reopen", Role.OPERATE),
        ("DELETE", "/v1/apps/{app}", Role.ADMIN),
        ("PUT", "/v1/apps/{app}", Role.ADMIN),
        ("POST", "/v1/cluster/keys", Role.ADMIN),
        ("POST", "/v1/branches/{id}/drain", Role.ADMIN),
        ("POST", "/v1/daemon/exit", Role.ADMIN),
        # a route nobody decided: a read is read, anything else admin
        ("GET", "/v1/someday", Role.READ),
        ("POST", "/v1/someday", Role.ADMIN),
    ],
)
def test_role_needed(method: str, template: str, role: Role | None) -> None:
    assert role_needed(method, template) is role


@pytest.mark.parametrize(
    ("has", "needed", "allowed"),
    [
        (Role.READ, Role.READ, True),
        (Role.READ, Role.OPERATE, False),
        (Role.OPERATE, Role.OPERATE, True),
        (Role.OPERATE, Role.ADMIN, False),
        (Role.ADMIN, Role.OPERATE, True),
        (Role.ADMIN, Role.ADMIN, True),
    ],
)
def test_roles_are_ordered(has: Role, needed: Role, allowed: bool) -> None:
    assert has.allows(needed) is allowed


def test_a_token_book_knows_the_admin_token_and_the_named_ones() -> None:
    book = TokenBook("daemon-token", [NamedToken("bob", "b" * 20, Role.READ)])
    assert book.who("daemon-token") is not None
    assert (book.who("daemon-token").name, book.who("b" * 20).role) == ("admin", Role.READ)  # type: ignore[union-attr]
    assert book.who("") is None and book.who("b" * 19) is None
    book.replace([NamedToken("carol", "c" * 20, Role.OPERATE)])
    assert book.who("b" * 20) is None and book.names == ("carol",)
    who = book.who("c" * 20)
    assert who is not None
    assert refusal("DELETE", "/v1/apps/{app}", Role.ADMIN, who) == (
        "DELETE /v1/apps/{app} needs role admin; token 'carol' has operate"
    )
    assert not TokenBook(None).enabled


GOOD = '[tokens.alice]\ntoken = "aaaaaaaaaaaaaaaaaaaa"\nrole = "operate"\n'


def test_a_token_table_is_parsed() -> None:
    assert is_token_table(GOOD) and not is_token_table("one-token-value")
    assert parse_token_table(GOOD, "f") == (NamedToken("alice", "a" * 20, Role.OPERATE),)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[tokens]\n", "names no token"),
        ("x = 1\n[tokens.a]\n", "unknown key(s) x"),
        ('[tokens.a]\ntoken = "short"\nrole = "read"\n', "16 characters"),
        ('[tokens.a]\ntoken = "aaaaaaaaaaaaaaaaaaaa"\nrole = "root"\n', "read, operate or admin"),
        ('[tokens.a]\ntoken = "aaaaaaaaaaaaaaaaaaaa"\nrole = "read"\nx = 1\n', "unknown key(s) x"),
        (GOOD + GOOD.replace("alice", "bob"), "the same token as [tokens.alice]"),
        ("[tokens.a\n", "bad TOML"),
    ],
)
def test_a_bad_token_table_names_its_rule(text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_token_table(text, "tokens.toml")


def test_token_file_of_either_kind_and_tls_options(tmp_path: Path) -> None:
    one, table = tmp_path / "one", tmp_path / "tokens.toml"
    one.write_text("single-token\n")
    table.write_text(GOOD)
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    base = {"state_dir": str(tmp_path / "s")}
    cfg = load({**base, "token_file": str(one)}, {})
    assert (cfg.api.token, cfg.api.tokens) == ("single-token", ())
    cfg = load({**base, "token_file": str(table)}, {})
    assert cfg.api.token is None and [t.name for t in cfg.api.tokens] == ["alice"]
    cfg = load({**base}, {"BRANCHD_TLS_CERT": str(cert), "BRANCHD_TLS_KEY": str(cert)})
    assert cfg.tls and cfg.api.tls_key == cert
    for flags, says in (
        ({"tls_cert": str(cert)}, "go together"),
        ({"tls_ca": str(cert)}, "is for a branch with TLS"),
        ({"tls_cert": str(cert), "tls_key": str(tmp_path / "nope")}, "no such file"),
        (
            {"tls_cert": str(cert), "tls_key": str(cert), "join": ("http://127.0.0.1:1",)},
            "must be https",
        ),
        ({"token_file": str(table), "no_auth": True}, "give one"),
    ):
        with pytest.raises(ConfigError, match=says):
            load({**base, **flags}, {})


def test_the_client_takes_the_daemons_own_token_beside_a_file_of_named_ones(
    tmp_path: Path,
) -> None:
    from branchctl.client import find_token

    (tmp_path / "token").write_text("own-token\n")
    table = tmp_path / "tokens.toml"
    table.write_text(GOOD)
    env = {"BRANCHD_STATE_DIR": str(tmp_path), "BRANCHD_TOKEN_FILE": str(table)}
    assert find_token(env, "http://127.0.0.1:8400") == "own-token"
    (tmp_path / "one").write_text("given-token\n")
    assert find_token({**env, "BRANCHD_TOKEN_FILE": str(tmp_path / "one")}, "x") == "given-token"


def test_docs_api_lists_every_routes_role() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    section = text.split("## Roles", 1)[1].split("\n## ", 1)[0]
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| method")
    ]
    listed = {(m, p): r for m, p, r in rows}
    assert listed == {k: (v.value if v else "none") for k, v in ROLES.items()}
