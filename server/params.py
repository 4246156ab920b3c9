"""A request's URL segments and query parameters, read one way for each kind of value.

Handlers call these and hand typed values to a service. The rules for the strings
themselves (ids, bounded integers, storable text, RFC 3339) are in shared/validation.py.
An absent parameter and an empty one (``?before=``) both mean "not given".
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from aiohttp import web

from shared.errors import ValidationError
from shared.validation import check_storable, parse_id, parse_int_param, parse_rfc3339

MAX_TEXT_CHARS = 1024


def path_id(request: web.Request, name: str, what: str | None = None) -> int:
    """A positive id from the URL segment ``name``; errors call it ``what`` (by default
    the name with spaces: ``channel_id`` → "channel id")."""
    return parse_id(request.match_info[name], what or name.replace("_", " "))


def _query(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    return None if raw is None or raw == "" else raw


def optional_id(request: web.Request, name: str, *, zero: bool = False) -> int | None:
    """A positive id, or None; with ``zero``, ``0`` is accepted too (``after=0``: from
    the start)."""
    raw = _query(request, name)
    if raw is None:
        return None
    if zero and raw == "0":
        return 0
    return parse_id(raw, name)


def int_param(request: web.Request, name: str, *, default: int, minimum: int, maximum: int) -> int:
    """An integer in ``minimum..maximum``, ``default`` when not given."""
    return parse_int_param(
        request.query.get(name), name, default=default, minimum=minimum, maximum=maximum
    )


def text_param(request: web.Request, name: str, *, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    """Text PostgreSQL can store, at most ``max_chars`` characters, or None."""
    raw = _query(request, name)
    if raw is None:
        return None
    check_storable(raw, name)
    if len(raw) > max_chars:
        raise ValidationError(f"{name}: at most {max_chars} characters")
    return raw


def choice_param(request: web.Request, name: str, choices: Sequence[str]) -> str | None:
    """One of ``choices``, or None."""
    raw = _query(request, name)
    if raw is not None and raw not in choices:
        raise ValidationError(f"{name}: one of {', '.join(choices)}")
    return raw


def time_param(request: web.Request, name: str) -> datetime | None:
    """An RFC 3339 time (no offset = UTC: these are filters people type), or None."""
    raw = _query(request, name)
    return None if raw is None else parse_rfc3339(raw, name, offset_required=False)
