"""Input checks shared by every entry point: JSON shapes, text PostgreSQL can store."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from shared.errors import ValidationError

CHANNEL_NAME_RE = re.compile(r"[a-z0-9_-]{1,80}")
MAX_BIGINT = 2**63 - 1
INT_PARAM_RE = re.compile(r"-?[0-9]{1,18}")
# [0-9], not \d: \d also matches other scripts' digits, which int() would then accept.
RFC3339_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
    r"(?:[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(?P<offset>[Zz]|[+-][0-9]{2}:[0-9]{2})?)?"
)
MAX_TIMESTAMP_CHARS = 64


def check_storable(value: str, field: str) -> str:
    """Reject text PostgreSQL cannot store: NUL characters and lone surrogates."""
    if "\x00" in value:
        raise ValidationError(f"{field}: must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{field}: contains invalid unicode (lone surrogate)") from None
    return value


def require_object(data: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValidationError("request body must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValidationError(f"unknown field(s): {', '.join(unknown)}")
    return data


def get_text(
    data: Mapping[str, Any],
    field: str,
    *,
    required: bool = True,
    min_len: int = 0,
    max_len: int,
    default: str | None = None,
) -> str | None:
    """A string field, its length counted in characters, not bytes."""
    if field not in data or data[field] is None:
        if required:
            raise ValidationError(f"{field}: required")
        return default
    value = data[field]
    if not isinstance(value, str):
        raise ValidationError(f"{field}: must be a string")
    check_storable(value, field)
    if not min_len <= len(value) <= max_len:
        raise ValidationError(f"{field}: length must be {min_len}-{max_len} characters")
    return value


def get_bool(data: Mapping[str, Any], field: str, *, default: bool) -> bool:
    if field not in data or data[field] is None:
        return default
    value = data[field]
    if not isinstance(value, bool):
        raise ValidationError(f"{field}: must be true or false")
    return value


def get_id(data: Mapping[str, Any], field: str) -> int:
    """A required positive integer id in a JSON body (bools are not ids)."""
    value = data.get(field)
    if value is None:
        raise ValidationError(f"{field}: required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field}: must be an integer")
    if not 1 <= value <= MAX_BIGINT:
        raise ValidationError(f"{field}: out of range")
    return value


def parse_id(raw: str, what: str = "id") -> int:
    """A positive integer from a URL segment or query parameter."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
        raise ValidationError(f"{what}: must be a positive integer")
    value = int(raw)
    if not 1 <= value <= MAX_BIGINT:
        raise ValidationError(f"{what}: out of range")
    return value


def parse_int_param(raw: str | None, name: str, *, default: int, minimum: int, maximum: int) -> int:
    if raw is None or raw == "":
        return default
    text = raw.strip()
    # An optional minus and ASCII digits only ("--5" passed a lstrip("-") check, then
    # made int() raise: a 500).
    if not INT_PARAM_RE.fullmatch(text):
        raise ValidationError(f"{name}: must be an integer")
    value = int(text)
    if not minimum <= value <= maximum:
        raise ValidationError(f"{name}: must be between {minimum} and {maximum}")
    return value


def parse_rfc3339(value: str, field: str, *, offset_required: bool = True) -> datetime:
    """An RFC 3339 date-time as aware UTC; the one parser of times from clients.

    The strictness differs by use, hence the flag. Strict (the default; ``deliver_at``):
    a full date-time with an offset, since a time to act at must not depend on anyone's
    zone. ``offset_required=False`` (the audit filters an operator types, documented as
    "no offset = UTC"): no offset means UTC, a date alone its midnight UTC, and spaces
    around the value are ignored."""
    text = value if offset_required else value.strip()
    m = RFC3339_RE.fullmatch(text) if len(value) <= MAX_TIMESTAMP_CHARS else None
    if m is None or (offset_required and m["offset"] is None):
        if offset_required:
            raise ValidationError(f"{field}: must be an RFC 3339 date-time with an offset")
        raise ValidationError(f"{field}: not an RFC 3339 time")
    year, month, day, hour, minute, second, frac, offset = m.groups()
    micro = int((frac or "0").ljust(6, "0")[:6])
    if offset is None or offset in ("Z", "z"):
        tz: timezone = UTC
    else:
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise ValidationError(f"{field}: invalid UTC offset")
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        # RFC 3339 allows a leap second (:60); PostgreSQL does not store one: round down.
        sec = min(int(second or 0), 59)
        parsed = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            sec,
            micro,
            tzinfo=tz,
        ).astimezone(UTC)
    except (ValueError, OverflowError):
        # OverflowError: valid as written, but out of datetime's range once in UTC.
        raise ValidationError(f"{field}: not a valid date-time") from None
    return parsed


def get_deliver_at(data: Mapping[str, Any], now: datetime, *, max_ahead_s: int) -> datetime:
    """``deliver_at`` (RFC 3339) or ``delay_seconds`` (a number), exactly one; in the
    future and at most ``max_ahead_s`` ahead of ``now``."""
    days = max_ahead_s // 86400
    has_at = data.get("deliver_at") is not None
    has_delay = data.get("delay_seconds") is not None
    if has_at == has_delay:
        raise ValidationError("give exactly one of deliver_at and delay_seconds")
    if has_at:
        raw = data["deliver_at"]
        if not isinstance(raw, str):
            raise ValidationError("deliver_at: must be an RFC 3339 string")
        when = parse_rfc3339(raw, "deliver_at")
        if when <= now:
            raise ValidationError("deliver_at: must be in the future")
    else:
        delay = data["delay_seconds"]
        if isinstance(delay, bool) or not isinstance(delay, int | float):
            raise ValidationError("delay_seconds: must be a number")
        # Range first: math.isfinite raises OverflowError on an int too large for a float.
        if delay > max_ahead_s:
            raise ValidationError(f"delay_seconds: at most {max_ahead_s} ({days} days)")
        if delay <= 0 or not math.isfinite(delay):
            raise ValidationError("delay_seconds: must be greater than 0")
        when = now + timedelta(seconds=delay)
    if when > now + timedelta(seconds=max_ahead_s):
        raise ValidationError(f"deliver_at: at most {days} days ahead")
    return when


def channel_name(value: str | None) -> str:
    if value is None or not CHANNEL_NAME_RE.fullmatch(value):
        raise ValidationError("name: 1-80 characters of a-z, 0-9, '-' and '_'")
    return value
