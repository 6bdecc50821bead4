"""The instance listing's answer is encoded item by item (issue 10, part 9:
a listing of 200 held all 200 dicts at once, 1.5 MiB of the daemon's heap
after the first one) and is byte for byte what one json.dumps gave."""

from __future__ import annotations

from typing import Any

import pytest

from branchd.api import routes


@pytest.mark.parametrize(
    "items",
    [
        [],
        [{"name": "s1"}],
        [{"name": "s1", "env": {"A": "é"}, "pid": None, "ports": [1, 2]}, {"x": 1.5, "y": True}],
    ],
)
def test_the_same_answer_as_one_json_dumps(items: list[dict[str, Any]]) -> None:
    one = routes._json({"items": items})
    each = routes._json_items(iter(items))
    assert each.body == one.body
    assert each.content_type == one.content_type == "application/json"
    assert each.charset == one.charset
    assert each.status == one.status == 200


def test_not_json_is_refused_as_before() -> None:
    with pytest.raises(ValueError):
        routes._json_items([{"x": float("nan")}])
