"""Input checks shared by every entry point: JSON shapes, text PostgreSQL can store."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from shared.errors import ValidationError

CHANNEL_NAME_RE = re.compile(r"[a-z0-9_-]{1,80}")
MAX_BIGINT = 2**63 - 1
INT_PARAM_RE = re.compile(r"-?[0-9]{1,18}")


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


def channel_name(value: str | None) -> str:
    if value is None or not CHANNEL_NAME_RE.fullmatch(value):
        raise ValidationError("name: 1-80 characters of a-z, 0-9, '-' and '_'")
    return value
