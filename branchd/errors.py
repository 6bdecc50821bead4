"""One exception hierarchy for the daemon; the API maps each to an HTTP status."""

from __future__ import annotations


class BranchdError(Exception):
    """Base of every error branchd raises on purpose.

    ``code`` is the stable machine-readable name that clients see in
    ``{"error": {"code": ..., "message": ...}}``; ``status`` the HTTP status.
    """

    code = "error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(BranchdError):
    code = "bad_request"
    status = 400


class Unauthorized(BranchdError):
    code = "unauthorized"
    status = 401


class NotFound(BranchdError):
    code = "not_found"
    status = 404


class Conflict(BranchdError):
    code = "conflict"
    status = 409


class PayloadTooLarge(BranchdError):
    code = "payload_too_large"
    status = 413


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
