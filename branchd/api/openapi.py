"""The OpenAPI 3.1 document, built from the route table and the JSON Schemas."""

from __future__ import annotations

import re
from typing import Any

from branchd import __version__
from branchd.api import schemas
from branchd.api.routes import Route

#: Every operation may answer these (auth, bad input, missing things, conflicts).
_ERRORS = {
    "400": "Bad request (not JSON, bad query parameter)",
    "401": "Missing or wrong token",
    "403": "Cross-origin request (an Origin header that is not the daemon's)",
    "404": "No such app or instance",
    "405": "Method not allowed",
    "409": "Conflict (name taken, being deleted) or restart_required",
    "413": "Body too large",
    "415": "A body whose Content-Type is not application/json",
    "421": "On a loopback bind, a Host that is not a loopback name or address",
    "422": "Invalid input (schema, name, rule)",
    "502": "A worker refused or did not confirm a runtime change",
    "503": "The broker could not be reached (broker_unavailable), or no room (full)",
}


def _operation_id(route: Route) -> str:
    words = re.sub(r"[{}]", "", route.path.removeprefix("/v1/")).replace(".", "_")
    return route.method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", words).strip("_")


#: A sealed body (the peer channel between branches).
_BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}


def build(routes: tuple[Route, ...]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    error_ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for route in routes:
        params: list[dict[str, Any]] = [
            {
                "name": p,
                "in": "path",
                "required": True,
                "schema": schemas.QUEUE_NAME if p == "queue" else schemas.NAME,
            }
            for p in re.findall(r"{(\w+)}", route.path)
        ]
        params += [
            {"name": q, "in": "query", "required": False, "schema": s} for q, s in route.query
        ]
        ok: dict[str, Any] = {"description": "OK"}
        if route.stream:
            ok["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
        elif route.text:
            ok["content"] = {"text/plain": {"schema": {"type": "string"}}}
        elif route.binary:
            ok["content"] = {"application/octet-stream": {"schema": _BINARY}}
        elif route.response is not None:
            ok["content"] = {"application/json": {"schema": route.response}}
        responses: dict[str, Any] = {str(route.ok): ok}
        if route.method == "PUT" and route.ok == 201:  # create or replace
            responses["200"] = {"description": "Replaced", "content": ok["content"]}
        if route.accepted is not None:
            responses["202"] = {
                "description": "Accepted (wait=false): the work goes on",
                "content": {"application/json": {"schema": route.accepted}},
            }
        for code, text in _ERRORS.items():
            responses[code] = {"description": text, "content": error_ref}
        op: dict[str, Any] = {
            "operationId": _operation_id(route),
            "summary": route.summary,
            "parameters": params,
            "responses": responses,
        }
        if route.binary:
            op["requestBody"] = {
                "required": True,
                "content": {"application/octet-stream": {"schema": _BINARY}},
            }
        if route.body is not None:
            # Optional: an empty body means {} (e.g. an instance made from its
            # app's defaults, an app with no env or defaults).
            op["requestBody"] = {
                "required": False,
                "content": {"application/json": {"schema": route.body}},
            }
        if route.path != "/v1/ping":
            op["security"] = [{"bearer": []}]  # (none only with --no-auth)
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "branchd",
            "version": __version__,
            "description": "Supervisor of Celery workers and processes; API v1.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": schemas.ERROR},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
