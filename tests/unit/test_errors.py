"""One error hierarchy, one class per code, both ways over the wire."""

from __future__ import annotations

import pytest

from branchd import errors
from branchd.errors import BranchdError, Full, Invalid, by_code, from_wire


def _all(cls: type[BranchdError]) -> list[type[BranchdError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _all(sub))]


@pytest.mark.parametrize("cls", _all(BranchdError), ids=lambda c: c.__name__)
def test_every_error_comes_back_as_itself(cls: type[BranchdError]) -> None:
    again = from_wire(cls("it broke").to_wire())
    assert type(again) is cls and again.message == "it broke"
    assert (again.code, again.status) == (cls.code, cls.status)


def test_codes_are_unique_and_full_exists() -> None:
    codes = [c.code for c in _all(BranchdError)]
    assert len(codes) == len(set(codes))
    assert by_code("full") is Full and Full.status == 503
    with pytest.raises(TypeError, match="'invalid' is Invalid's"):

        class Again(BranchdError):  # a second class may not take a code
            code = "invalid"


def test_unknown_and_malformed_answers_stay_errors() -> None:
    assert type(from_wire({"error": {"code": "new_in_v2", "message": "m"}})) is BranchdError
    bad = from_wire(["not", "an", "error"])
    assert isinstance(bad, errors.BranchdError) and "malformed" in bad.message
    assert isinstance(from_wire({"error": {"code": "invalid", "message": "x"}}), Invalid)
