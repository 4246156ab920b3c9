"""Unit checks of the pure parts: RFC 3339, deliver_at rules, ticks, Retry-After, stats."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial

import pytest

from shared.errors import ValidationError
from shared.services.delayed.admission import retry_after
from shared.services.delayed.queue_stats import growth_per_min, parse_samples
from shared.services.delayed.scheduling import MAX_AHEAD_S, delivery_tick
from shared.validation import get_deliver_at, parse_rfc3339

resolve_deliver_at = partial(get_deliver_at, max_ahead_s=MAX_AHEAD_S)

NOW = datetime(2030, 6, 15, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-06-15T12:30:00Z", datetime(2030, 6, 15, 12, 30, tzinfo=UTC)),
        ("2030-06-15t12:30:00z", datetime(2030, 6, 15, 12, 30, tzinfo=UTC)),
        ("2030-06-15 12:30:00Z", datetime(2030, 6, 15, 12, 30, tzinfo=UTC)),
        ("2030-06-15T14:30:00+02:00", datetime(2030, 6, 15, 12, 30, tzinfo=UTC)),
        ("2030-06-15T07:00:00-05:30", datetime(2030, 6, 15, 12, 30, tzinfo=UTC)),
        ("2030-06-15T12:30:00.5Z", datetime(2030, 6, 15, 12, 30, 0, 500_000, tzinfo=UTC)),
        ("2030-06-15T12:30:00.123456789Z", datetime(2030, 6, 15, 12, 30, 0, 123_456, tzinfo=UTC)),
        ("2030-06-30T23:59:60Z", datetime(2030, 6, 30, 23, 59, 59, tzinfo=UTC)),  # leap second
    ],
)
def test_rfc3339_accepted(text, expected):
    assert parse_rfc3339(text, "deliver_at") == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2030-06-15",
        "2030-06-15T12:30Z",
        "2030-06-15T12:30:00",
        "2030-06-15T12:30:00+0200",
        "2030-06-15T12:30:00+02",
        "2030-13-01T00:00:00Z",
        "2030-02-29T00:00:00Z",
        "2030-06-15T24:00:00Z",
        "2030-06-15T12:60:00Z",
        "2030-06-15T12:30:00+25:00",
        "2030-06-15T12:30:00.Z",
        "2030-06-15T12:30:00.1234567890Z",
        "+2030-06-15T12:30:00Z",
        "2030-06-15T12:30:00Z ",
        " 2030-06-15T12:30:00Z",
        "2030-06-15T12:30:00ZZ",
        "2030-06-15T12:30:00Z\n",
        "٢٠٣٠-06-15T12:30:00Z",
        "2030-W24-6T12:30:00Z",
        "x" * 10_000,
    ],
)
def test_rfc3339_rejected(text):
    with pytest.raises(ValidationError):
        parse_rfc3339(text, "deliver_at")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-06-15T12:30:00", datetime(2030, 6, 15, 12, 30, tzinfo=UTC)),
        ("2030-06-15", datetime(2030, 6, 15, tzinfo=UTC)),
        (" 2030-06-15T14:30:00+02:00 ", datetime(2030, 6, 15, 12, 30, tzinfo=UTC)),
    ],
)
def test_rfc3339_without_an_offset_is_utc_where_allowed(text, expected):
    assert parse_rfc3339(text, "since", offset_required=False) == expected


@pytest.mark.parametrize("text", ["yesterday", "2024-13-45", "9" * 100, "2030-06-15T12:30Z"])
def test_rfc3339_lenient_still_rejects_non_times(text):
    with pytest.raises(ValidationError):
        parse_rfc3339(text, "since", offset_required=False)


def test_resolve_deliver_at_rules():
    assert resolve_deliver_at({"delay_seconds": 1}, NOW) == NOW + timedelta(seconds=1)
    assert resolve_deliver_at({"delay_seconds": 0.25}, NOW) == NOW + timedelta(seconds=0.25)
    assert resolve_deliver_at({"delay_seconds": MAX_AHEAD_S}, NOW) == NOW + timedelta(
        seconds=MAX_AHEAD_S
    )
    assert resolve_deliver_at({"deliver_at": "2030-06-15T12:00:01Z"}, NOW) == NOW + timedelta(
        seconds=1
    )
    edge = (NOW + timedelta(days=30)).isoformat()
    assert resolve_deliver_at({"deliver_at": edge}, NOW) == NOW + timedelta(days=30)
    assert resolve_deliver_at({"deliver_at": None, "delay_seconds": 5}, NOW) == NOW + timedelta(
        seconds=5
    )
    for bad in (
        {},
        {"deliver_at": None, "delay_seconds": None},
        {"delay_seconds": 5, "deliver_at": "2030-06-15T12:00:01Z"},
        {"deliver_at": "2030-06-15T12:00:00Z"},  # exactly now: not in the future
        {"deliver_at": (NOW + timedelta(days=30, seconds=1)).isoformat()},
        {"delay_seconds": MAX_AHEAD_S + 0.5},
        {"delay_seconds": float("nan")},
        {"delay_seconds": float("inf")},
        {"delay_seconds": -0.0},
        {"delay_seconds": False},
        {"deliver_at": 5},
        {"deliver_at": ["2030-06-15T12:00:01Z"]},
    ):
        with pytest.raises(ValidationError):
            resolve_deliver_at(bad, NOW)


def test_delivery_tick_rounds_up_to_100ms():
    job_id, run_at = delivery_tick(datetime(2030, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC))
    assert run_at == datetime(2030, 1, 1, 0, 0, 0, 200_000, tzinfo=UTC)
    assert job_id == f"herald:deliver:{int(run_at.timestamp() * 1000)}"
    same, _ = delivery_tick(datetime(2030, 1, 1, 0, 0, 0, 190_000, tzinfo=UTC))
    exact, exact_at = delivery_tick(datetime(2030, 1, 1, 0, 0, 0, 200_000, tzinfo=UTC))
    assert same == job_id == exact and exact_at == run_at
    later, _ = delivery_tick(datetime(2030, 1, 1, 0, 0, 0, 200_001, tzinfo=UTC))
    assert later != job_id


def test_retry_after_is_time_to_the_next_due_message():
    assert retry_after(None, NOW) == 1
    assert retry_after(NOW - timedelta(seconds=5), NOW) == 1
    assert retry_after(NOW + timedelta(seconds=41.2), NOW) == 42
    assert retry_after(NOW + timedelta(days=3), NOW) == 300


def test_sample_parsing_and_growth():
    samples = parse_samples([(b"100.000:10", 100.0), (b"junk", 110.0), (b"160.000:40", 160.0)])
    assert samples == [(100.0, 10), (160.0, 40)]
    assert growth_per_min(samples) == 30.0
    assert growth_per_min([(100.0, 10)]) == 0.0
    assert growth_per_min([(100.0, 10), (100.0, 20)]) == 0.0
    falling = [(0.0, 60), (30.0, 45), (60.0, 30)]
    assert growth_per_min(falling) == -30.0
