"""The Redis circuit breaker (shared/breaker.py), on a fake clock."""

from shared.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_at_the_first_failure_and_probes_once_after_open_s():
    clock = Clock()
    b = CircuitBreaker("redis", open_s=3.0, clock=clock)
    assert b.allow() and b.state == CLOSED
    assert b.failure() is True  # closed → open: the caller logs the outage once
    assert b.state == OPEN and b.opened_total == 1
    assert not b.allow()
    clock.now += 2.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow() and b.state == HALF_OPEN  # the one probe
    assert not b.allow()  # everyone else keeps skipping while it is out
    assert b.failure() is False  # still the same outage
    assert b.state == OPEN and b.opened_total == 1
    clock.now += 3.0
    assert b.allow()
    assert b.success() is True  # the outage is over
    assert b.state == CLOSED and b.allow() and b.allow()
    assert b.success() is False


def test_a_probe_that_never_reports_is_replaced_after_open_s():
    clock = Clock()
    b = CircuitBreaker("redis", open_s=1.0, clock=clock)
    b.failure()
    clock.now += 1.0
    assert b.allow()  # the probe's caller was cancelled and never reports
    clock.now += 0.5
    assert not b.allow()
    clock.now += 0.6
    assert b.allow()  # another probe, not half-open for good


def test_breakers_are_independent():
    a, b = CircuitBreaker("redis"), CircuitBreaker("redis")
    a.failure()
    assert a.is_open and not b.is_open and b.allow()
