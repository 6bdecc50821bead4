"""A cheap first look at a request body, so that jsonschema loads only for a bad one.

jsonschema (with referencing, rpds, attrs and its metaschemas) is about 3 MiB
of the daemon's resident memory (issue 10, part 9). :func:`check` knows the
few keywords of the request schemas in ``schemas.py`` and answers with the
verdict of JSON Schema 2020-12 where it is sure: True (valid), False
(invalid), None (cannot tell: a keyword or a value it does not handle).
Only True is acted on: the body is taken without jsonschema. Anything else
goes to jsonschema, which gives the verdict and the message, so answers are
unchanged. tests/unit/test_precheck.py checks the verdicts against
jsonschema's on the real schemas.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Verdict = bool | None

#: Keywords that never change the verdict (annotations).
_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "$comment"})

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    # 2.0 is an integer in JSON Schema (jsonschema's type checker agrees)
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool))
        or (isinstance(v, float) and v.is_integer())
    ),
}


def check(schema: Any, data: Any) -> Verdict:
    """Is ``data`` valid against ``schema``: True, False, or None if not sure."""
    if not isinstance(schema, dict):
        return None  # boolean schemas and the like: not used in requests
    verdict: Verdict = True
    for key, value in schema.items():
        if key in _ANNOTATIONS:
            continue
        rule = _RULES.get(key)
        one = rule(value, data, schema) if rule is not None else None
        if one is False:
            return False
        if one is None:
            verdict = None
    return verdict


def _all(verdicts: Any) -> Verdict:
    result: Verdict = True
    for v in verdicts:
        if v is False:
            return False
        if v is None:
            result = None
    return result


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _type(value: Any, data: Any, _schema: Any) -> Verdict:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(n in _TYPES for n in names):
        return None
    return any(_TYPES[n](data) for n in names)


def _enum(value: Any, data: Any, _schema: Any) -> Verdict:
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        return None  # 1 vs 1.0 vs True: leave other enums to jsonschema
    return isinstance(data, str) and data in value


def _bound(compare: Callable[[Any, Any], bool]) -> Callable[[Any, Any, Any], Verdict]:
    def rule(value: Any, data: Any, _schema: Any) -> Verdict:
        if not _number(value):
            return None
        return compare(data, value) if _number(data) else True

    return rule


def _length(compare: Callable[[int, int], bool]) -> Callable[[Any, Any, Any], Verdict]:
    def rule(value: Any, data: Any, _schema: Any) -> Verdict:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return compare(len(data), value) if isinstance(data, str) else True

    return rule


def _count(compare: Callable[[int, int], bool]) -> Callable[[Any, Any, Any], Verdict]:
    def rule(value: Any, data: Any, _schema: Any) -> Verdict:
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        return compare(len(data), value) if isinstance(data, list) else True

    return rule


def _pattern(value: Any, data: Any, _schema: Any) -> Verdict:
    if not isinstance(value, str):
        return None
    # re.search, not match: a JSON Schema pattern is not anchored (jsonschema's way)
    return re.search(value, data) is not None if isinstance(data, str) else True


def _items(value: Any, data: Any, schema: Any) -> Verdict:
    if "prefixItems" in schema or not isinstance(value, dict):
        return None
    return _all(check(value, v) for v in data) if isinstance(data, list) else True


def _unique(value: Any, data: Any, _schema: Any) -> Verdict:
    if value is False or not isinstance(data, list):
        return True
    if value is not True or not all(isinstance(v, str) for v in data):
        return None  # equality of numbers, bools and containers: jsonschema's
    return len(set(data)) == len(data)


def _required(value: Any, data: Any, _schema: Any) -> Verdict:
    if not isinstance(value, list):
        return None
    return all(k in data for k in value) if isinstance(data, dict) else True


def _properties(value: Any, data: Any, _schema: Any) -> Verdict:
    if not isinstance(value, dict):
        return None
    if not isinstance(data, dict):
        return True
    return _all(check(value[k], v) for k, v in data.items() if k in value)


def _additional(value: Any, data: Any, schema: Any) -> Verdict:
    if "patternProperties" in schema:
        return None
    if not isinstance(data, dict):
        return True
    known = schema.get("properties", {})
    extra = [v for k, v in data.items() if k not in known]
    if value is False:
        return not extra
    if value is True:
        return True
    return _all(check(value, v) for v in extra) if isinstance(value, dict) else None


def _one_of(value: Any, data: Any, _schema: Any) -> Verdict:
    if not isinstance(value, list):
        return None
    verdicts = [check(s, data) for s in value]
    valid = verdicts.count(True)
    if valid > 1:
        return False
    if None in verdicts:
        return None
    return valid == 1


def _any_of(value: Any, data: Any, _schema: Any) -> Verdict:
    if not isinstance(value, list):
        return None
    verdicts = [check(s, data) for s in value]
    if True in verdicts:
        return True
    return None if None in verdicts else False


_RULES: dict[str, Callable[[Any, Any, Any], Verdict]] = {
    "type": _type,
    "enum": _enum,
    "minimum": _bound(lambda d, v: d >= v),
    "maximum": _bound(lambda d, v: d <= v),
    "minLength": _length(lambda n, v: n >= v),
    "maxLength": _length(lambda n, v: n <= v),
    "minItems": _count(lambda n, v: n >= v),
    "maxItems": _count(lambda n, v: n <= v),
    "pattern": _pattern,
    "items": _items,
    "uniqueItems": _unique,
    "required": _required,
    "properties": _properties,
    "additionalProperties": _additional,
    "oneOf": _one_of,
    "anyOf": _any_of,
}
