"""Which role each route needs, and who a bearer token is (pure: no I/O).

One table from (method, route template) to role, so that a new route is a
decision made here (tests/unit/test_roles.py fails for a route of
``routes.ROUTES`` missing from it). ``read`` reads; ``operate`` runs what
is declared (start, stop, restart, consumers, autoscale, scale, logs
reopen); ``admin`` changes what is declared and the branch itself (apps,
queues, keys, drain, leave, exit).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from branchd.config import ADMIN_TOKEN_NAME, NamedToken, Role

R, OP, A = Role.READ, Role.OPERATE, Role.ADMIN
_APP = "/v1/apps/{app}"
_INST = _APP + "/instances/{name}"

#: (method, route template) -> the role it needs. ``None``: no token at all.
ROLES: dict[tuple[str, str], Role | None] = {
    ("GET", "/v1/ping"): None,
    ("GET", "/v1/branch"): R,
    ("GET", "/v1/events"): R,
    ("GET", "/metrics"): R,  # (or none at all with --metrics-public)
    ("GET", "/v1/branches"): R,
    ("GET", "/v1/branches/{id}"): R,
    ("POST", "/v1/branches/self/leave"): A,
    ("POST", "/v1/branches/{id}/drain"): A,
    ("GET", "/v1/branches/{id}/drain"): R,
    ("POST", "/v1/branches/{id}/undrain"): A,
    ("GET", "/v1/cluster/keys"): R,
    ("POST", "/v1/cluster/keys"): A,
    ("POST", "/v1/cluster/keys/{id}/use"): A,
    ("DELETE", "/v1/cluster/keys/{id}"): A,
    # sealed with the cluster key (its authentication); in a cluster without a
    # key (loopback only) the branches' shared token: the daemon's own, admin
    ("POST", "/v1/cluster/peer"): A,
    ("GET", "/v1/openapi.json"): R,
    ("POST", "/v1/daemon/exit"): A,
    ("POST", "/v1/branch/exit"): A,
    ("GET", "/v1/apps"): R,
    ("PUT", _APP): A,
    ("GET", _APP): R,
    ("PATCH", _APP): A,
    # (a GET shows what it holds, the broker URL's password and an instance's
    # env values included: a read token is for those who may see them)
    ("GET", _APP + "/celery-config"): R,
    ("DELETE", _APP): A,
    ("GET", _APP + "/instances"): R,
    # scale: one more instance of an app as declared, or one fewer
    ("POST", _APP + "/instances"): OP,
    ("POST", _APP + "/start"): OP,
    ("POST", _APP + "/stop"): OP,
    ("POST", _APP + "/restart"): OP,
    ("GET", _INST): R,
    # what it runs (command, user, env): a declaration
    ("PATCH", _INST): A,
    ("DELETE", _INST): OP,
    ("POST", _INST + "/start"): OP,
    ("POST", _INST + "/stop"): OP,
    ("POST", _INST + "/restart"): OP,
    ("GET", _INST + "/logs"): R,
    ("POST", "/v1/logs/reopen"): OP,
    ("GET", _APP + "/stats"): R,
    # a worker's settings, as Celery masks them (no password): a read
    ("GET", _APP + "/lint"): R,
    ("GET", _APP + "/queues/{queue}/consumers"): R,
    ("GET", _APP + "/queues/{queue}/depth"): R,
    ("GET", _APP + "/depth"): R,
    ("GET", _INST + "/stats"): R,
    ("GET", _APP + "/queues"): R,
    ("GET", _APP + "/queues/{queue}"): R,
    # a queue's declaration (exchange, routing): the app's
    ("PUT", _APP + "/queues/{queue}"): A,
    ("DELETE", _APP + "/queues/{queue}"): A,
    ("GET", _INST + "/queues"): R,
    # consumers: a running worker's queues, as declared
    ("PUT", _INST + "/queues/{queue}"): OP,
    ("DELETE", _INST + "/queues/{queue}"): OP,
    ("GET", _INST + "/autoscale"): R,
    ("PUT", _INST + "/autoscale"): OP,
}

#: The request's ``Principal`` once its token was checked (the audit line's who).
PRINCIPAL = "branchd.principal"
#: The caller's name on a forwarded request, for the owner's audit line (the
#: proof, not this, is what the owner trusts).
CALLER_HEADER = "X-Branchd-Caller"

#: What the table does not name (a route added without a decision): a read
#: is read, anything else admin; the test of the table fails for it.
_SAFE = {"GET": R, "HEAD": R}


def role_needed(method: str, template: str) -> Role | None:
    """The role (method, route template) needs; None: no token."""
    if (method, template) in ROLES:
        return ROLES[(method, template)]
    return _SAFE.get(method, A)


def missing(routes: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The routes the table does not name."""
    return [r for r in routes if r not in ROLES]


@dataclass(frozen=True)
class Principal:
    """Who made a request: a token's name and its role."""

    name: str
    role: Role


class TokenBook:
    """The tokens in force: the daemon's own (admin) and the named ones of a
    token file, replaced whole on reload (SIGHUP)."""

    def __init__(self, admin: str | None, named: Iterable[NamedToken] = ()) -> None:
        self._admin = admin
        self._named: tuple[NamedToken, ...] = tuple(named)

    def replace(self, named: Iterable[NamedToken]) -> None:
        self._named = tuple(named)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self._named)

    @property
    def enabled(self) -> bool:
        return self._admin is not None or bool(self._named)

    def who(self, given: str) -> Principal | None:
        """The holder of ``given``; every token is compared (in constant time
        each), so the answer's timing says nothing of which one matched."""
        found: Principal | None = None
        secret = given.encode()
        if self._admin is not None and hmac.compare_digest(secret, self._admin.encode()):
            found = Principal(ADMIN_TOKEN_NAME, Role.ADMIN)
        for t in self._named:
            if hmac.compare_digest(secret, t.token.encode()) and found is None:
                found = Principal(t.name, t.role)
        return found


def refusal(method: str, template: str, needed: Role, who: Principal) -> str:
    return f"{method} {template} needs role {needed.value}; token {who.name!r} has {who.role.value}"
