"""Issue 15, part 4, in the pure parts: umask and startretries as users give
them, env_file paths, and the order an instance's environment is built in."""

from __future__ import annotations

from typing import Any

import pytest

from branchd.errors import Invalid
from branchd.model import App, InstanceSpec, startretries_from, umask_from, umask_text
from branchd.process.specs import apply_fields, build_spec

# fmt: off
UMASKS: list[tuple[Any, int]] = [
    ("022", 0o022), ("0022", 0o022), ("22", 0o022), ("0o027", 0o027), ("0O077", 0o077),
    ("0", 0), ("000", 0), ("777", 0o777), (" 027 ", 0o027), (18, 0o022), (0, 0), (511, 0o777),
    (18.0, 0o022),
]
BAD_UMASKS: list[Any] = ["", "0o", "8", "09", "1000", "0o1000", "abc", "-22", "0x12", "٢٢",
                         512, -1, True, 18.5, None, ["022"]]
# fmt: on


@pytest.mark.parametrize(("given", "mask"), UMASKS)
def test_umask_from(given: Any, mask: int) -> None:
    assert umask_from(given) == mask


@pytest.mark.parametrize("given", BAD_UMASKS)
def test_a_bad_umask_names_the_rule(given: Any) -> None:
    with pytest.raises(ValueError, match="octal string"):
        umask_from(given)


def test_a_umask_is_shown_as_three_octal_digits() -> None:
    assert [umask_text(m) for m in (0o022, 0, 0o777, 0o7)] == ["022", "000", "777", "007"]


@pytest.mark.parametrize(
    ("given", "held"), [(3, 3), ("5", 5), ("forever", None), (None, None), (1, 1)]
)
def test_startretries_from(given: Any, held: int | None) -> None:
    assert startretries_from(given) == held


@pytest.mark.parametrize("given", ["always", "3.5", True, 2.5])
def test_a_bad_startretries_is_refused(given: Any) -> None:
    with pytest.raises(ValueError, match="forever"):
        startretries_from(given)


SPEC = InstanceSpec(app="web", name="api", command=("./api",), branch="b")


@pytest.mark.parametrize(
    ("fields", "changes"),
    [
        ({"umask": "027"}, {"umask": 0o027}),
        ({"umask": 18}, {"umask": 0o022}),
        ({"umask": None}, {"umask": None}),
        ({"env_file": "/etc/api.env"}, {"env_file": ("/etc/api.env",)}),
        ({"env_file": ["/a.env", "-/b.env"]}, {"env_file": ("/a.env", "-/b.env")}),
        ({"env_file": []}, {"env_file": ()}),
        ({"env_file": None}, {"env_file": ()}),
    ],
)
def test_apply_fields(fields: dict[str, Any], changes: dict[str, Any]) -> None:
    out = apply_fields(SPEC, fields)
    assert {k: getattr(out, k) for k in changes} == changes


def test_startretries_forever_in_the_policy() -> None:
    assert apply_fields(SPEC, {"startretries": "forever"}).policy.startretries is None
    back = apply_fields(apply_fields(SPEC, {"startretries": "forever"}), {"startretries": 4})
    assert back.policy.startretries == 4


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"umask": "888"}, "bad umask '888'"),
        ({"env_file": "api.env"}, "env_file 'api.env': give an absolute path"),
        ({"env_file": ["/ok.env", "-rel.env"]}, "env_file '-rel.env'"),
        ({"startretries": 0}, "at least 1"),
        ({"startretries": "never"}, "forever"),
    ],
)
def test_bad_fields_are_refused_naming_the_rule(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(Invalid, match=message):
        apply_fields(SPEC, fields)


def test_the_apps_defaults_give_env_file_umask_and_startretries() -> None:
    app = App(
        "web",
        defaults={"env_file": "-/etc/web.env", "umask": "007", "startretries": "forever"},
    )
    spec = build_spec(app, "api", {"command": ["./api"]}, "b", 0.0)
    assert (spec.env_file, spec.umask, spec.policy.startretries) == (("-/etc/web.env",), 7, None)
    own = build_spec(app, "api", {"command": ["./api"], "umask": "022"}, "b", 0.0)
    assert own.umask == 0o022  # the instance's own wins
