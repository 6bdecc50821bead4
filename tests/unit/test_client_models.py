"""The client's models against the OpenAPI document the daemon serves: the
client (which never imports branchd) and the API cannot drift apart unseen."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from branchctl import models

from branchd.api import openapi
from branchd.api.routes import ROUTES

DOC = openapi.build(ROUTES)
INST = "/v1/apps/{app}/instances/{name}"

#: model -> (path, method) whose 200 answer it parses ("items": one of a list).
ANSWERS: dict[type[Any], tuple[str, str]] = {
    models.App: ("/v1/apps/{app}", "get"),
    models.Instance: (INST, "get"),
    models.Queue: ("/v1/apps/{app}/queues/{queue}", "get"),
    models.Consumer: (INST + "/queues", "get"),
    models.Autoscale: (INST + "/autoscale", "get"),
    models.QueueDepth: ("/v1/apps/{app}/queues/{queue}/depth", "get"),
    models.Stats: (INST + "/stats", "get"),
    models.Branch: ("/v1/branch", "get"),
    models.Member: ("/v1/branches/{id}", "get"),
    models.ActionItem: ("/v1/apps/{app}/start", "post"),
    models.LintFinding: ("/v1/apps/{app}/lint", "get"),
}


def _schema(path: str, method: str) -> dict[str, Any]:
    schema: dict[str, Any] = DOC["paths"][path][method]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    if set(schema.get("properties", {})) == {"items"}:
        schema = schema["properties"]["items"]["items"]
    return schema


def _fields(model: type[Any]) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(model) if f.name != "raw"}


@pytest.mark.parametrize("model", list(ANSWERS), ids=lambda m: m.__name__)
def test_a_model_has_exactly_the_fields_of_its_answer(model: type[Any]) -> None:
    schema = _schema(*ANSWERS[model])
    assert set(_fields(model)) == set(schema["properties"])


@pytest.mark.parametrize("model", list(ANSWERS), ids=lambda m: m.__name__)
def test_what_a_model_needs_the_answer_always_has(model: type[Any]) -> None:
    schema = _schema(*ANSWERS[model])
    needed = {
        name
        for name, f in _fields(model).items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    assert needed <= set(schema.get("required", [])), needed - set(schema.get("required", []))


def test_the_capacity_of_a_branch() -> None:
    capacity = _schema("/v1/branch", "get")["properties"]["capacity"]
    assert set(_fields(models.Capacity)) == set(capacity["properties"])
