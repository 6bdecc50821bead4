"""One exception hierarchy for the daemon; the API maps each to an HTTP status."""

from __future__ import annotations


class BranchdError(Exception):
    """Base of every error branchd raises on purpose.

    ``code`` is the stable machine-readable name that clients see in
    ``{"error": {"code": ..., "message": ...}}``; ``status`` the HTTP status.
    Each code names one class (:func:`by_code`), so that an error answered by
    another branch is raised again unchanged where a request was forwarded.
    """

    code = "error"
    status = 500

    def __init__(self, message: str, **details: bool | int | str | None) -> None:
        super().__init__(message)
        self.message = message
        #: More fields of the wire form (``applied`` of a storage error).
        self.details = details

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code in _BY_CODE:
            raise TypeError(f"error code {cls.code!r} is {_BY_CODE[cls.code].__name__}'s")
        _BY_CODE[cls.code] = cls

    def to_wire(self) -> dict[str, dict[str, bool | int | str | None]]:
        """The JSON body of the answer."""
        return {"error": {"code": self.code, "message": self.message, **self.details}}


_BY_CODE: dict[str, type[BranchdError]] = {BranchdError.code: BranchdError}


def by_code(code: str) -> type[BranchdError]:
    """The class of an error code (BranchdError itself for a code unknown here)."""
    return _BY_CODE.get(code, BranchdError)


def from_wire(body: object) -> BranchdError:
    """The error a JSON error body names, with its message (a malformed body
    is a BranchdError that says so)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return BranchdError(f"malformed error answer: {body!r:.200}")
    code, message = error.get("code"), error.get("message")
    details = {
        k: v
        for k, v in error.items()
        if k not in ("code", "message") and (v is None or isinstance(v, bool | int | str))
    }
    cls, text = by_code(str(code)), str(message) if message is not None else str(code)
    try:
        return cls(text, **details)
    except TypeError:  # fields this release's class does not take
        return cls(text)


class BadRequest(BranchdError):
    code = "bad_request"
    status = 400


class Unauthorized(BranchdError):
    code = "unauthorized"
    status = 401


class Forbidden(BranchdError):
    """A request from another origin (a web page's), refused whatever its token;
    or a valid token whose role does not reach the route's (with ``needs`` and
    ``has``: ``api/roles.py``)."""

    code = "forbidden"
    status = 403


class NotFound(BranchdError):
    code = "not_found"
    status = 404


class Conflict(BranchdError):
    code = "conflict"
    status = 409


class PayloadTooLarge(BranchdError):
    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(BranchdError):
    """A request body that is not declared JSON (a form or text/plain: what a
    web page can send without a preflight)."""

    code = "unsupported_media_type"
    status = 415


class Misdirected(BranchdError):
    """A Host that is not this daemon's (DNS rebinding against a loopback bind)."""

    code = "misdirected_request"
    status = 421


class Invalid(BranchdError):
    """Well-formed input that breaks a rule (schema, name pattern, min > max)."""

    code = "invalid"
    status = 422


class ConfigError(BranchdError):
    """Bad configuration: the daemon refuses to start."""

    code = "config"
    status = 500


class SpawnError(BranchdError):
    """A process could not be started (missing executable, bad cwd, bad user)."""

    code = "spawn_failed"
    status = 500


class StoreError(BranchdError):
    code = "store"
    status = 500


class StorageFailure(BranchdError):
    """A write of the state database failed (the base of the two below)."""

    code = "storage_failure"
    status = 503

    def __init__(self, message: str, *, applied: bool = False) -> None:
        super().__init__(message, applied=applied)
        self.applied = applied


class StorageFull(StorageFailure):
    """The state database cannot be written: the disk is full. ``applied``
    says whether the change was made anyway (a stop is always carried out;
    its record is written once there is room)."""

    code = "storage_full"
    status = 507


class StorageUnavailable(StorageFailure):
    """The state database cannot be written for another reason (I/O error,
    read-only file system); ``applied`` as for ``StorageFull``."""

    code = "storage_unavailable"
    status = 503


class Full(BranchdError):
    """A branch has no room for a new instance (admission control): the sender
    tries the next choice. Draining branches answer it too."""

    code = "full"
    status = 503


class BranchUnreachable(BranchdError):
    """The branch that must answer a request cannot be reached."""

    code = "branch_unreachable"
    status = 503


class ControlFailed(BranchdError):
    """A worker refused a remote-control command or did not confirm it in time."""

    code = "control_failed"
    status = 502


class RestartRequired(BranchdError):
    """A runtime change the running worker cannot take: it needs a new process
    (autoscale on a worker started with a fixed --concurrency). Nothing is changed."""

    code = "restart_required"
    status = 409


class WorkerNotRunning(BranchdError):
    """A runtime change needs a running worker (the declaration is kept)."""

    code = "not_running"
    status = 409


class BrokerUnavailable(BranchdError):
    """A remote-control request could not be sent: the broker is down or was not
    reached in time.

    Distinct from a missing reply (sent, but the node did not answer), so that
    a broker outage is not taken for hung workers.
    """

    code = "broker_unavailable"
    status = 503


class BrokerMisconfigured(BrokerUnavailable):
    """The broker cannot be used at all from here: its transport does not load
    (a missing library). A configuration error, not an outage: retrying
    cannot help until the installation is fixed, and the message says so."""

    code = "broker_misconfigured"


class BadMessage(BranchdError):
    """Bytes from another branch that are not a message of this release's wire
    form (truncated, corrupt, a field of the wrong type): dropped and counted
    by the receiver, never an exception of the decoder's own."""

    code = "bad_message"
    status = 400


class LogWriterUnavailable(BranchdError):
    """The branch's log writer process cannot be reached or started: a spawn
    falls back to writing its files directly (copy-truncate rotation)."""

    code = "log_writer_unavailable"
    status = 503
