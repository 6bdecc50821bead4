"""Errors of the Celery edge."""

from __future__ import annotations

from branchd.errors import BranchdError


class BrokerUnavailable(BranchdError):
    """A request could not be sent: the broker is down or was not reached in time.

    Distinct from a ``None`` reply (sent, but the node did not answer), so that
    a broker outage is not taken for hung workers.
    """

    code = "broker_unavailable"
    status = 503
