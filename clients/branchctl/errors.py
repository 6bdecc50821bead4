"""The errors of the branchd client: one hierarchy, rooted at ApiError."""

from __future__ import annotations

import json
from typing import Any


class ApiError(Exception):
    """The daemon answered with an error (or could not be asked at all).

    ``status`` is the HTTP status (0 when there was no answer), ``code`` the
    machine-readable error code of the API (``not_found``, ``conflict``...),
    ``message`` the human-readable explanation.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @classmethod
    def from_body(cls, status: int, body: bytes | str) -> ApiError:
        """Build the error from an error answer's body.

        The API answers ``{"error": {"code": ..., "message": ...}}``; any other
        body (a proxy's HTML page, an empty body) gives code ``http_<status>``
        and the start of the body as the message.
        """
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            error = data["error"]
            code = error.get("code")
            message = error.get("message")
            if isinstance(code, str) and code:
                return cls(status, code, message if isinstance(message, str) else "")
        snippet = " ".join(text.split())[:200]
        return cls(status, f"http_{status}", snippet or f"HTTP {status} with an empty body")


class ConnectionFailed(ApiError):
    """The daemon could not be reached (refused, unresolvable, timed out...)."""

    def __init__(self, url: str, reason: str, code: str = "connection_failed") -> None:
        super().__init__(0, code, f"cannot reach branchd at {url}: {reason}")
        self.url = url
        self.reason = reason


class NoAnswer(ApiError):
    """The request reached the daemon but no answer came in time.

    Not a connection failure: the daemon may still be working on it (a stop
    waits for its instance's stopwaitsecs).
    """

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__(
            0,
            "timeout",
            f"branchd at {url} did not answer within {timeout:g}s; it may still be working",
        )
        self.url = url
        self.timeout = timeout


class BadConfig(Exception):
    """A file given to ``branchctl import`` cannot be read as a supervisord
    config: no daemon was asked. ``problems`` holds one line each, ``file:line:
    what is wrong`` where the line is known."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)
