"""Attachments: multipart upload (streamed), metadata, download, delete."""

from __future__ import annotations

import asyncio
import os
import re
import warnings
from collections.abc import AsyncIterator
from urllib.parse import quote, unquote

from aiohttp import BodyPartReader, MultipartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader

from server import clientip
from server.keys import ATTACHMENTS, SETTINGS
from server.middlewares import current_user
from server.params import path_id
from shared.errors import PayloadTooLarge, ValidationError

CHUNK_BYTES = 64 * 1024
# Room for the multipart boundaries and part headers around the file itself.
MULTIPART_OVERHEAD = 64 * 1024
MAX_EXTRA_PART_BYTES = 64 * 1024
MAX_PARTS_BEFORE_FILE = 16
# Served as opaque bytes even with `attachment` + `nosniff`: types a browser could run.
SCRIPTABLE_TYPE = re.compile(r"html|xml|javascript|ecmascript|svg|xsl")
# What aiohttp's multipart reader raises on a body that does not parse. It only warns on
# a bad Content-Disposition; where warnings are errors (tests), that arrives raised.
MALFORMED = (
    ValueError,
    AssertionError,
    RuntimeError,
    HttpProcessingError,
    BadContentDispositionHeader,
)


def client_ip(request: web.Request) -> str | None:
    """The client address for the audit trail, by the same rule as the SSE limits (peer,
    or ``X-Forwarded-For`` only through ``HERALD_TRUSTED_PROXIES``)."""
    ip = clientip.client_ip(request, request.app[SETTINGS].trusted_proxies)
    return None if ip == clientip.UNKNOWN else ip


def _part_name(part: BodyPartReader) -> str | None:
    # aiohttp warns (it does not raise) on a malformed Content-Disposition; treat such a
    # part as unnamed instead of letting a warning filter turn it into an error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return part.name


def _part_filename(part: BodyPartReader) -> str | None:
    """The part's file name. Browsers send it as raw UTF-8, some clients (aiohttp's
    among them) percent-encoded: decode escapes when they form valid UTF-8."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        name = part.filename
    if name is None or "%" not in name:
        return name
    try:
        return unquote(name, errors="strict")
    except UnicodeDecodeError:
        return name


async def _file_part(reader: MultipartReader) -> BodyPartReader:
    """Skip (bounded) other fields until the part named ``file``."""
    skipped = 0
    for _ in range(MAX_PARTS_BEFORE_FILE):
        try:
            part = await reader.next()
        except MALFORMED:
            raise ValidationError("malformed multipart body") from None
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            raise ValidationError("nested multipart bodies are not accepted")
        if _part_name(part) == "file":
            return part
        while chunk := await _read_chunk(part):
            skipped += len(chunk)
            if skipped > MAX_EXTRA_PART_BYTES:
                raise PayloadTooLarge("too much data besides the file")
    raise ValidationError("file: required (multipart field 'file')")


async def _read_chunk(part: BodyPartReader) -> bytes:
    try:
        return await part.read_chunk(CHUNK_BYTES)
    except MALFORMED:
        raise ValidationError("malformed multipart body") from None


async def _chunks(part: BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await _read_chunk(part):
        yield chunk


async def upload_attachment(request: web.Request) -> web.Response:
    user = current_user(request)
    channel_id = path_id(request, "channel_id")
    limit = request.app[SETTINGS].max_upload_bytes
    length = request.content_length
    if length is not None and length > limit + MULTIPART_OVERHEAD:
        raise PayloadTooLarge(f"attachment is larger than {limit} bytes")
    if request.content_type != "multipart/form-data":
        raise ValidationError("expected multipart/form-data with a 'file' field")
    service = request.app[ATTACHMENTS]
    # Refuse a channel the user cannot post in before reading any of the body.
    await service.check_can_upload(user, channel_id)
    try:
        reader = await request.multipart()
    except (*MALFORMED, KeyError):
        raise ValidationError("malformed multipart body") from None
    part = await _file_part(reader)
    attachment = await service.upload(
        user,
        channel_id,
        filename=_part_filename(part),
        content_type=part.headers.get(hdrs.CONTENT_TYPE),
        chunks=_chunks(part),
    )
    return web.json_response(attachment, status=201)


async def get_attachment(request: web.Request) -> web.Response:
    user = current_user(request)
    attachment = await request.app[ATTACHMENTS].get(user, path_id(request, "attachment_id"))
    return web.json_response(attachment)


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII fallback name and the exact name as RFC 5987."""
    fallback = "".join(
        ch if 0x20 <= ord(ch) < 0x7F and ch not in '"\\;%' else "_" for ch in filename
    )
    return (
        f'attachment; filename="{fallback or "file"}"; '
        f"filename*=UTF-8''{quote(filename, safe='')}"
    )


async def download_attachment(request: web.Request) -> web.StreamResponse:
    user = current_user(request)
    download = await request.app[ATTACHMENTS].open_content(
        user, path_id(request, "attachment_id"), client_ip=client_ip(request)
    )
    ctype = download.content_type
    if SCRIPTABLE_TYPE.search(ctype):
        ctype = "application/octet-stream"
    response = web.StreamResponse(
        headers={
            hdrs.CONTENT_DISPOSITION: content_disposition(download.filename),
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            hdrs.CACHE_CONTROL: "private, no-cache",
        }
    )
    response.content_type = ctype
    response.content_length = download.size
    fd = download.fd
    try:
        await response.prepare(request)
        sent = 0
        # Never more than the size we announced, even if the file grew meanwhile.
        while sent < download.size:
            chunk = await asyncio.to_thread(
                os.pread, fd, min(CHUNK_BYTES, download.size - sent), sent
            )
            if not chunk:
                break
            await response.write(chunk)
            sent += len(chunk)
        await response.write_eof()
    except ConnectionError:
        pass  # the client left mid-download
    finally:
        # A plain close: nothing to await, so a cancelled handler cannot skip it.
        os.close(fd)
    return response


async def delete_attachment(request: web.Request) -> web.Response:
    user = current_user(request)
    await request.app[ATTACHMENTS].delete(
        user, path_id(request, "attachment_id"), client_ip=client_ip(request)
    )
    return web.Response(status=204)
