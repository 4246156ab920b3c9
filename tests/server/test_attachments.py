"""Attachments over HTTP: upload, metadata, download, and every deletion branch."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import os
import time
from pathlib import Path

import aiohttp
import pytest

from shared.constants import QUEUE_NAME
from shared.services.attachments import deletions as file_deletions
from shared.services.audit import AuditTrail
from tests.attachment_helpers import (
    audit_rows,
    failing_unlink,
    file_of,
    files_on_disk,
    row_of,
    upload,
    upload_ok,
)
from tests.conftest import UserFactory
from tests.helpers import API, make_channel


async def test_upload_download_roundtrip(client, alice, settings, db):
    channel = await make_channel(client, alice)
    data = os.urandom(200_000)
    resp = await upload(
        client, alice, channel, data, filename="report.pdf", content_type="application/pdf"
    )
    assert resp.status == 201
    body = await resp.json()
    assert set(body) >= {"id", "filename", "content_type", "size", "sha256", "created_at"}
    assert body["filename"] == "report.pdf"
    assert body["content_type"] == "application/pdf"
    assert body["size"] == len(data)
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    # Stored under a server-chosen key, never the client's name.
    path = await file_of(db, settings, body["id"])
    assert path.read_bytes() == data
    assert "report" not in str(path)
    assert not list((settings.upload_dir / ".tmp").iterdir())

    meta = await client.get(f"{API}/attachments/{body['id']}", headers=alice.headers)
    assert meta.status == 200
    assert await meta.json() == body

    resp = await client.get(f"{API}/attachments/{body['id']}/content", headers=alice.headers)
    assert resp.status == 200
    assert await resp.read() == data
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Content-Disposition"].startswith('attachment; filename="report.pdf"')
    assert resp.headers["Content-Type"] == "application/pdf"


async def test_download_headers_are_safe_for_hostile_names_and_types(client, alice):
    channel = await make_channel(client, alice)
    resp = await upload(
        client,
        alice,
        channel,
        b"<script>alert(1)</script>",
        filename='../../evil"; x=\u202egpj.html',
        content_type="text/html",
    )
    assert resp.status == 201
    body = await resp.json()
    assert "/" not in body["filename"] and "\u202e" not in body["filename"]
    resp = await client.get(f"{API}/attachments/{body['id']}/content", headers=alice.headers)
    assert resp.status == 200
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert "\r" not in disposition and "\n" not in disposition
    fallback = disposition.split('filename="', 1)[1].split('"', 1)[0]
    assert all(0x20 <= ord(c) < 0x7F and c not in '"\\;' for c in fallback)
    # A type a browser could run is served as opaque bytes.
    assert resp.headers["Content-Type"] == "application/octet-stream"


async def test_unicode_filename_kept_as_metadata(client, alice):
    channel = await make_channel(client, alice)
    body = await (await upload(client, alice, channel, b"x", filename="Grüße 日本.txt")).json()
    assert body["filename"] == "Grüße 日本.txt"
    resp = await client.get(f"{API}/attachments/{body['id']}/content", headers=alice.headers)
    assert (
        "filename*=UTF-8''Gr%C3%BC%C3%9Fe%20%E6%97%A5%E6%9C%AC.txt"
        in resp.headers["Content-Disposition"]
    )


async def test_empty_file_is_accepted(client, alice):
    channel = await make_channel(client, alice)
    body = await upload_ok(client, alice, channel, b"")
    assert body["size"] == 0
    assert body["sha256"] == hashlib.sha256(b"").hexdigest()


async def test_oversized_upload_413_and_nothing_left(make_client, make_user, settings, db):
    client = await make_client(max_upload_bytes=1000)
    alice = await UserFactory(client)("alice")
    channel = await make_channel(client, alice)
    resp = await upload(client, alice, channel, b"a" * 1001)
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"
    assert await db.fetchval("SELECT count(*) FROM attachments") == 0
    assert files_on_disk(settings.upload_dir) == set()
    assert not any((settings.upload_dir / ".tmp").iterdir())
    # Exactly at the limit is fine.
    assert (await upload(client, alice, channel, b"a" * 1000)).status == 201


async def test_oversized_streamed_without_content_length(make_client, make_user, settings, db):
    client = await make_client(max_upload_bytes=100_000)
    alice = await UserFactory(client)("alice")
    channel = await make_channel(client, alice)
    boundary = "b0undary"

    async def body():
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        for _ in range(40):
            yield b"z" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    resp = await client.post(
        f"{API}/channels/{channel}/attachments",
        data=body(),
        headers={**alice.headers, "Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert resp.status == 413
    assert await db.fetchval("SELECT count(*) FROM attachments") == 0
    assert not any((settings.upload_dir / ".tmp").iterdir())
    assert files_on_disk(settings.upload_dir) == set()


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"data": b"not multipart", "headers": {"Content-Type": "text/plain"}}, 422),
        ({"json": {"file": "x"}}, 422),
        ({"data": b"garbage", "headers": {"Content-Type": "multipart/form-data"}}, 422),
        (
            {
                "data": b"--x\r\nbroken",
                "headers": {"Content-Type": "multipart/form-data; boundary=x"},
            },
            422,
        ),
    ],
)
async def test_malformed_uploads_are_4xx(client, alice, settings, kwargs, status):
    channel = await make_channel(client, alice)
    headers = {**alice.headers, **kwargs.pop("headers", {})}
    resp = await client.post(f"{API}/channels/{channel}/attachments", headers=headers, **kwargs)
    assert resp.status == status, await resp.text()
    assert "error" in await resp.json()
    assert files_on_disk(settings.upload_dir) == set()


async def test_missing_file_field_and_other_fields(client, alice):
    channel = await make_channel(client, alice)
    fd = aiohttp.FormData()
    fd.add_field("note", "hello")
    resp = await client.post(
        f"{API}/channels/{channel}/attachments", data=fd, headers=alice.headers
    )
    assert resp.status == 422
    # Other fields before the file are skipped.
    fd = aiohttp.FormData()
    fd.add_field("note", "hello")
    fd.add_field("file", b"data", filename="a.txt")
    resp = await client.post(
        f"{API}/channels/{channel}/attachments", data=fd, headers=alice.headers
    )
    assert resp.status == 201


def raw_multipart(disposition: bytes, data: bytes = b"x") -> tuple[bytes, str]:
    boundary = "XyZb0undary"
    body = (
        b"--"
        + boundary.encode()
        + b"\r\nContent-Disposition: "
        + disposition
        + b"\r\nContent-Type: text/plain\r\n\r\n"
        + data
        + b"\r\n--"
        + boundary.encode()
        + b"--\r\n"
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize(
    "disposition",
    [
        b'form-data; name="file"; filename="a%00b.txt"',
        b'form-data; name="file"; filename="a%ED%A0%80.txt"',
        b"form-data; name=\"file\"; filename*=UTF-8''%00evil",
        b'form-data; name="file"; filename="\xff\xfe.txt"',
        b'form-data; name="file"; filename="x"; filename="y"',
        b'form-data; name="file"; filename',
        b'form-data; name=file; filename="unterminated',
        b'form-data; name="file"; filename="' + b"A" * 5000 + b'"',
        b'form-data; name="file"; filename="../../etc/passwd"',
        b"attachment",
    ],
)
async def test_hostile_part_headers_never_500(client, alice, settings, db, disposition):
    channel = await make_channel(client, alice)
    body, ctype = raw_multipart(disposition)
    resp = await client.post(
        f"{API}/channels/{channel}/attachments",
        data=body,
        headers={**alice.headers, "Content-Type": ctype},
    )
    assert resp.status in (201, 400, 422), await resp.text()
    if resp.status == 201:
        att = await resp.json()
        assert "/" not in att["filename"] and "\x00" not in att["filename"]
        assert len(att["filename"]) <= 255
        assert files_on_disk(settings.upload_dir) == {(await row_of(db, att["id"]))["storage_key"]}
    else:
        assert files_on_disk(settings.upload_dir) == set()


async def test_upload_needs_auth_and_visibility(client, alice, bob):
    private = await make_channel(client, alice, "secret", private=True)
    resp = await upload(client, bob, private, b"x")
    assert resp.status == 404
    resp = await client.post(f"{API}/channels/{private}/attachments", data=b"x")
    assert resp.status == 401
    resp = await upload(client, alice, 999_999, b"x")
    assert resp.status == 404
    for bad in ("abc", "0", "-1", "99999999999999999999", "1;DROP TABLE attachments"):
        resp = await client.post(
            f"{API}/channels/{bad}/attachments", data=b"x", headers=alice.headers
        )
        assert 400 <= resp.status < 500


async def test_private_attachment_invisible_to_outsiders(client, alice, bob):
    private = await make_channel(client, alice, "secret", private=True)
    att = await upload_ok(client, alice, private, b"top secret")
    for path in (f"/attachments/{att['id']}", f"/attachments/{att['id']}/content"):
        resp = await client.get(API + path, headers=bob.headers)
        assert resp.status == 404
    resp = await client.delete(f"{API}/attachments/{att['id']}", headers=bob.headers)
    assert resp.status == 404


async def test_bad_attachment_ids(client, alice):
    for bad in ("abc", "0", "-5", "1.5", "9" * 30, "%00", "..%2F..%2Fetc"):
        for method in ("GET", "DELETE"):
            resp = await client.request(method, f"{API}/attachments/{bad}", headers=alice.headers)
            assert 400 <= resp.status < 500, (method, bad, resp.status)


# -- deletion -------------------------------------------------------------------------


async def test_delete_success_db_first_then_file(client, alice, settings, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel, b"bye")
    path = await file_of(db, settings, att["id"])
    assert path.exists()
    resp = await client.delete(f"{API}/attachments/{att['id']}", headers=alice.headers)
    assert resp.status == 204
    assert not path.exists()
    row = await row_of(db, att["id"])
    assert row["state"] == "deleted"
    rows = await audit_rows(db, "attachment.delete")
    assert len(rows) == 1
    assert rows[0]["result"] == "ok"
    assert rows[0]["actor_id"] == alice.id
    assert rows[0]["target_type"] == "attachment" and rows[0]["target_id"] == str(att["id"])
    assert rows[0]["client_ip"] == "127.0.0.1"
    for path_ in (f"/attachments/{att['id']}", f"/attachments/{att['id']}/content"):
        assert (await client.get(API + path_, headers=alice.headers)).status == 404
    resp = await client.delete(f"{API}/attachments/{att['id']}", headers=alice.headers)
    assert resp.status == 404


async def test_delete_missing_file_recorded_as_missing(client, alice, settings, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    (await file_of(db, settings, att["id"])).unlink()
    resp = await client.delete(f"{API}/attachments/{att['id']}", headers=alice.headers)
    assert resp.status == 204
    assert (await row_of(db, att["id"]))["state"] == "deleted"
    [entry] = await audit_rows(db, "attachment.delete")
    assert entry["result"] == "missing"


async def test_delete_by_other_user_403_and_audited(client, alice, bob, settings, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    resp = await client.delete(f"{API}/attachments/{att['id']}", headers=bob.headers)
    assert resp.status == 403
    assert (await row_of(db, att["id"]))["state"] == "active"
    assert (await file_of(db, settings, att["id"])).exists()
    [entry] = await audit_rows(db, "attachment.delete_denied")
    assert entry["result"] == "denied" and entry["actor_id"] == bob.id
    assert entry["client_ip"] == "127.0.0.1"
    assert await audit_rows(db, "attachment.delete") == []


async def test_admin_may_delete_anyones(client, alice, admin, settings, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    resp = await client.delete(f"{API}/attachments/{att['id']}", headers=admin.headers)
    assert resp.status == 204
    assert not (await file_of(db, settings, att["id"])).exists()


async def test_concurrent_double_delete_one_204_one_404(client, alice, db):
    channel = await make_channel(client, alice)
    atts = [await upload_ok(client, alice, channel, b"%d" % i) for i in range(10)]
    for att in atts:
        url = f"{API}/attachments/{att['id']}"
        statuses = sorted(
            r.status
            for r in await asyncio.gather(
                client.delete(url, headers=alice.headers), client.delete(url, headers=alice.headers)
            )
        )
        assert statuses == [204, 404]
    assert len(await audit_rows(db, "attachment.delete")) == 10
    assert (await AuditTrail(db=db).verify()).ok


async def test_failed_unlink_is_queued_for_retry_after_1s(
    client, alice, settings, db, redis, monkeypatch
):
    """The disk is made to fail for real: a patched os.unlink raising EIO."""
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    before = time.time() * 1000
    with failing_unlink(monkeypatch, lambda name: name == path.name) as calls:
        resp = await client.delete(f"{API}/attachments/{att['id']}", headers=alice.headers)
    assert resp.status == 204  # the record change committed; the file is the worker's now
    assert calls["failed"] == 1
    assert path.exists()
    row = await row_of(db, att["id"])
    assert row["state"] == "deleting" and "EIO" in row["delete_error"]
    [retry] = await audit_rows(db, "attachment.file_delete_retry")
    assert retry["result"] == "failed" and retry["details"]["retry_in_s"] == 1
    # The retry job is deferred by the first step of the production schedule: 1 s.
    assert file_deletions.DELETE_RETRY_BACKOFF_S == (1.0, 2.0, 4.0)
    [(_job, score)] = await redis.zrange(QUEUE_NAME, 0, -1, withscores=True)
    assert 900 <= score - before <= 1500
    # Gone from the users' view already.
    resp = await client.get(f"{API}/attachments/{att['id']}", headers=alice.headers)
    assert resp.status == 404


async def test_health_attachments_section(client, alice, settings, db, monkeypatch):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    path = await file_of(db, settings, att["id"])
    with failing_unlink(monkeypatch, lambda name: name == path.name):
        await client.delete(f"{API}/attachments/{att['id']}", headers=alice.headers)
    body = await (await client.get("/health")).json()
    section = body["attachments"]
    assert section["pending_file_deletions"] == 1
    assert section["delete_failures_total"] == 0
    assert section["last_orphan_scan"] is None
    text = str(section)
    assert str(settings.upload_dir) not in text and "127.0.0.1" not in text


async def test_upload_dir_is_only_place_written(client, alice, settings, tmp_path):
    channel = await make_channel(client, alice)
    await upload_ok(client, alice, channel, b"x")
    outside = set(os.listdir(tmp_path))
    await upload(client, alice, channel, b"y", filename="../../../outside.txt")
    assert set(os.listdir(tmp_path)) == outside
    assert not Path(tmp_path, "outside.txt").exists()


async def test_declared_length_far_over_the_limit_is_refused_before_reading(
    make_client, settings, db
):
    client = await make_client(max_upload_bytes=1000)
    alice = await UserFactory(client)("alice")
    channel = await make_channel(client, alice)
    resp = await upload(client, alice, channel, b"a" * 200_000)
    assert resp.status == 413
    assert await db.fetchval("SELECT count(*) FROM attachments") == 0
    assert files_on_disk(settings.upload_dir) == set()


async def test_audit_ip_honours_trusted_proxies_only(make_client, settings, db):
    trusted = await make_client(trusted_proxies=(ipaddress.ip_network("127.0.0.0/8"),))
    alice = await UserFactory(trusted)("alice")
    channel = await make_channel(trusted, alice)
    att = await upload_ok(trusted, alice, channel)
    resp = await trusted.delete(
        f"{API}/attachments/{att['id']}",
        headers={**alice.headers, "X-Forwarded-For": "6.6.6.6, 203.0.113.9"},
    )
    assert resp.status == 204
    [entry] = await audit_rows(db, "attachment.delete")
    assert entry["client_ip"] == "203.0.113.9"


async def test_forwarded_for_ignored_from_untrusted_peers(client, alice, db):
    channel = await make_channel(client, alice)
    att = await upload_ok(client, alice, channel)
    resp = await client.delete(
        f"{API}/attachments/{att['id']}",
        headers={**alice.headers, "X-Forwarded-For": "203.0.113.9"},
    )
    assert resp.status == 204
    [entry] = await audit_rows(db, "attachment.delete")
    assert entry["client_ip"] == "127.0.0.1"
