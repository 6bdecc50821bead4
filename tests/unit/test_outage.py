"""What a retrying broker connection logs: once per cause, reminders backing off to 30 s."""

from __future__ import annotations

from branchd.celery.outage import REMIND_MAX, Outage, Say, failed, recovered


def run(events: list[tuple[float, str | None]]) -> list[tuple[float, Say]]:
    """Feed (time, cause) events (None: the connection works); what was said, when."""
    state, said = Outage(), []
    for now, cause in events:
        state, say = recovered(state) if cause is None else failed(state, cause, now)
        if say is not None:
            said.append((now, say))
    return said


def test_a_healthy_connection_says_nothing() -> None:
    assert run([(0.0, None), (1.0, None)]) == []


def test_a_broker_down_for_ten_minutes_is_said_once_then_recalled_at_most_every_30s() -> None:
    attempts = [(t * 2.0, "Connection refused") for t in range(300)]  # every 2 s for 10 min
    said = run(attempts)
    assert said[0] == (0.0, Say.FAILED)
    reminders = [t for t, s in said if s == Say.STILL]
    assert all(s == Say.STILL for _, s in said[1:])
    gaps = [b - a for a, b in zip([0.0, *reminders], reminders, strict=False)]
    assert gaps[:4] == [2.0, 4.0, 8.0, 16.0]  # backing off...
    assert max(gaps) <= REMIND_MAX + 2.0 and min(gaps[5:]) >= REMIND_MAX  # ...to 30 s
    assert len(said) < 30  # not 300


def test_a_new_cause_is_said_at_once_and_a_recovery_once() -> None:
    said = run(
        [
            (0.0, "Connection refused"),
            (0.1, "Connection refused"),
            (0.2, "the redis transport cannot be loaded: No module named 'packaging'"),
            (0.3, "the redis transport cannot be loaded: No module named 'packaging'"),
            (0.4, None),
            (0.5, None),
            (0.6, "Connection refused"),
        ]
    )
    assert said == [
        (0.0, Say.FAILED),
        (0.2, Say.FAILED),
        (0.4, Say.RECOVERED),
        (0.6, Say.FAILED),
    ]


def test_attempts_are_counted_until_it_works() -> None:
    state = Outage()
    for t in range(5):
        state, _ = failed(state, "down", float(t))
    assert (state.attempts, state.since, state.cause) == (5, 0.0, "down")
    state, _ = recovered(state)
    assert state == Outage()
