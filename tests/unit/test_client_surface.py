"""The Python client's surface: every method documented, the sync twin complete."""

from __future__ import annotations

import inspect
from pathlib import Path

from branchctl.client import AsyncClient, Client

ROOT = Path(__file__).resolve().parents[2]


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(f)
        for name, f in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_every_async_method_has_a_docstring() -> None:
    missing = [
        name
        for name, f in inspect.getmembers(AsyncClient, inspect.isfunction)
        if not name.startswith("_") and not (f.__doc__ or "").strip()
    ]
    assert missing == []


def test_the_sync_client_has_every_method_with_the_same_parameters() -> None:
    async_, sync = _public(AsyncClient), _public(Client)
    assert set(async_) <= set(sync)
    for name, signature in async_.items():
        assert list(sync[name].parameters.values()) == list(signature.parameters.values()), name


def test_docs_client_page_names_every_method() -> None:
    page = (ROOT / "docs" / "client.md").read_text()
    missing = [name for name in _public(AsyncClient) if f"`{name}(" not in page]
    assert missing == []
