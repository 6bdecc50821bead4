"""precheck's verdicts agree with jsonschema's on the API's own schemas.

precheck lets a body through without jsonschema only when it answers True,
so a True where jsonschema would refuse the body is the bug that matters;
a wrong False would only be wasted work, and is checked all the same.
Bodies come from a seeded generator that follows each schema and strays
from it (wrong types, values at and past the bounds, extra keys, names
that break the patterns).
"""

from __future__ import annotations

import random
from typing import Any

import jsonschema
import pytest

from branchd.api import precheck, schemas
from branchd.api.routes import ROUTES

REQUEST_SCHEMAS: dict[str, schemas.Schema] = {
    "APP_IN": schemas.APP_IN,
    "APP_PATCH": schemas.APP_PATCH,
    "INSTANCE_IN": schemas.INSTANCE_IN,
    "INSTANCES_IN": schemas.INSTANCES_IN,
    "INSTANCE_PATCH": schemas.INSTANCE_PATCH,
    "QUEUE_IN": schemas.QUEUE_IN,
    "AUTOSCALE_IN": schemas.AUTOSCALE_IN,
    "EMPTY": schemas.EMPTY,
    "EXIT_IN": schemas.EXIT_IN,
    "KEY_IN": schemas.KEY_IN,
}

WILD: list[Any] = [
    None, True, False, 0, 1, -1, 2.0, 2.5, -0.5, 255, 256, 1024, 2**40, 2**40 + 1, 1e300,
    "", "a", "web-1", "bad name!", "x" * 300, "ü", "1abc", "a.b", ".", "DEBUG", "always",
    [], ["a"], ["a", "a"], [1, 1.0], {}, {"a": 1}, {"a": "b"}, {"min": 1, "max": 2},
]  # fmt: skip


def _strings(rng: random.Random) -> str:
    return "".join(rng.choice("ab-_.:9Z !ü") for _ in range(rng.randint(0, 12)))


def generate(schema: Any, rng: random.Random, depth: int = 0) -> Any:
    """A value that mostly follows ``schema``, and often does not."""
    if rng.random() < 0.12 or depth > 6 or not isinstance(schema, dict):
        return rng.choice(WILD)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return generate(rng.choice(schema[key]), rng, depth + 1)
    kinds = schema.get("type", "object")
    kind = rng.choice(kinds) if isinstance(kinds, list) else kinds
    if "enum" in schema and rng.random() < 0.8:
        return rng.choice(schema["enum"])
    if kind == "object":
        props = schema.get("properties", {})
        out = {k: generate(v, rng, depth + 1) for k, v in props.items() if rng.random() < 0.3}
        for k in schema.get("required", ()):
            if rng.random() < 0.9:
                out[k] = generate(props.get(k, {}), rng, depth + 1)
        if rng.random() < 0.15:
            extra = schema.get("additionalProperties")
            out[rng.choice(["zz", "env", "x y"])] = generate(
                extra if isinstance(extra, dict) else {}, rng, depth + 1
            )
        return out
    if kind == "array":
        items = [
            generate(schema.get("items", {}), rng, depth + 1) for _ in range(rng.randint(0, 3))
        ]
        if items and rng.random() < 0.2:
            items.append(items[0])  # a duplicate, for uniqueItems
        return items
    if kind == "string":
        if "pattern" in schema and rng.random() < 0.5:
            return rng.choice(["web", "w1", "a.b-c_d", "q:1", "Abc", "-x", "a b", ""])
        return _strings(rng)
    if kind in ("integer", "number"):
        low, high = schema.get("minimum", -10), schema.get("maximum", 10)
        value = rng.choice([low, high, low - 1, high + 1, (low + high) // 2])
        if kind == "number" and rng.random() < 0.3:
            return value + 0.5
        return float(value) if rng.random() < 0.2 else value
    if kind == "boolean":
        return rng.random() < 0.5
    return None


def _judged(schema: schemas.Schema, bodies: list[Any]) -> dict[Any, int]:
    validator = jsonschema.Draft202012Validator(schema)
    verdicts: dict[Any, int] = {True: 0, False: 0, None: 0}
    for body in bodies:
        verdict = precheck.check(schema, body)
        if verdict is not None:
            assert verdict == validator.is_valid(body), (verdict, body)
        verdicts[verdict] += 1
    return verdicts


@pytest.mark.parametrize("name", sorted(REQUEST_SCHEMAS))
def test_precheck_agrees_with_jsonschema_on_generated_bodies(name: str) -> None:
    schema = REQUEST_SCHEMAS[name]
    rng = random.Random(name)
    verdicts = _judged(schema, [generate(schema, rng) for _ in range(3000)])
    # the fast path is taken (on 1% at least: each optional field a schema
    # gains makes a random body of it likelier to break one rule; INSTANCES_IN
    # requires two fields, which the generator gives together only now and then;
    # INSTANCE_IN has over 40 optional ones: 29 of 3,000 with the cgroup limits;
    # with the 7 worker limits, 21 of 3,000 for INSTANCE_IN and INSTANCE_PATCH,
    # 4 for INSTANCES_IN)
    floors = {"INSTANCES_IN": 2, "INSTANCE_IN": 15, "INSTANCE_PATCH": 15}
    assert verdicts[True] > floors.get(name, 30), verdicts


def test_every_request_schema_of_the_routes_is_covered() -> None:
    # (a body of either form is checked against its own: INSTANCE_CREATE's anyOf)
    bodies = {id(s) for r in ROUTES if r.body is not None for s in r.body.get("anyOf", [r.body])}
    assert bodies <= {id(s) for s in REQUEST_SCHEMAS.values()}


def test_what_a_client_usually_sends_needs_no_jsonschema() -> None:
    bench = {
        "name": "s0001",
        "command": ["/usr/bin/sleep", "100000"],
        "startsecs": 0,
        "autorestart": "always",
        "stopwaitsecs": 10,
    }
    assert precheck.check(schemas.INSTANCE_IN, bench) is True
    assert precheck.check(schemas.APP_IN, {}) is True
    assert precheck.check(schemas.APP_IN, {"broker": "redis://h:6379/0", "autoscale": None})
    assert precheck.check(schemas.INSTANCE_PATCH, {"log_max_bytes": 2048.0}) is True


@pytest.mark.parametrize(
    ("schema", "body", "verdict"),
    [
        ({"type": "integer"}, True, False),  # a bool is no integer
        ({"type": "integer"}, 2.0, True),
        ({"type": "number"}, False, False),
        ({"enum": ["a"]}, ["a"], False),
        ({"enum": [1, True]}, 1, None),  # non-string enums: jsonschema's
        ({"type": "string", "pattern": "b"}, "abc", True),  # search, not match
        ({"minLength": 2}, 5, True),  # length applies to strings only
        ({"uniqueItems": True}, [1, 1.0], None),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1, False),
        ({"oneOf": [{"type": "integer"}, {"const": 1}]}, "a", None),
        ({"anyOf": [{"const": 1}, {"type": "string"}]}, "a", True),
        ({"patternProperties": {"a": {}}}, {}, None),
        ({"items": {}, "prefixItems": [{}]}, [], None),
        ({"additionalProperties": False, "properties": {"a": {}}}, {"a": 1, "b": 2}, False),
    ],
)
def test_precheck_is_sure_only_of_what_it_knows(schema: Any, body: Any, verdict: Any) -> None:
    assert precheck.check(schema, body) is verdict
    if verdict is not None:
        assert jsonschema.Draft202012Validator(schema).is_valid(body) is verdict
