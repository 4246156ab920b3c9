"""The reference web client at /app/: off by default (404 like any unknown route); on,
served with a strict Content-Security-Policy, no inline script or style, and never a
file from outside web/, whatever the path says."""

from __future__ import annotations

import asyncio
from html.parser import HTMLParser
from pathlib import Path

import pytest

from server.webfiles import CONTENT_SECURITY_POLICY, load_files, web_root
from tests.helpers import expect_error

WEB = Path(__file__).resolve().parents[2] / "web"


async def test_app_is_an_unknown_route_when_off(client):
    for path in ("/app/", "/app/index.html", "/app/app.js", "/app"):
        await expect_error(await client.get(path, allow_redirects=False), 404, "not_found", path)


@pytest.fixture
async def web_client(make_client):
    return await make_client(web_app=True)


def csp_directives(header: str) -> dict[str, str]:
    out = {}
    for part in header.split(";"):
        name, _, value = part.strip().partition(" ")
        out[name] = value.strip()
    return out


async def test_index_has_a_strict_policy(web_client):
    resp = await web_client.get("/app/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    policy = csp_directives(resp.headers["Content-Security-Policy"])
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["object-src"] == "'none'"
    assert not any("unsafe" in v or "*" in v for v in policy.values()), policy
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert (await web_client.get("/app/index.html")).status == 200
    redirect = await web_client.get("/app", allow_redirects=False)
    assert redirect.status == 308 and redirect.headers["Location"] == "/app/"


class PageParts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.script_text: list[str] = []
        self.styles = 0
        self.inline_attrs: list[str] = []
        self.refs: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.inline_attrs += [n for n, _ in attrs if n == "style" or n.startswith("on")]
        if tag == "script":
            self.scripts.append(found)
            self._in_script = True
            self.refs.append(found.get("src") or "")
        elif tag == "style":
            self.styles += 1
        elif tag == "link" and found.get("href"):
            self.refs.append(found["href"] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.script_text.append(data)


async def test_the_page_has_no_inline_script_or_style_and_its_files_are_served(web_client):
    parts = PageParts()
    parts.feed(await (await web_client.get("/app/")).text())
    assert parts.scripts and all(s.get("src") for s in parts.scripts)
    assert "".join(parts.script_text).strip() == ""
    assert parts.styles == 0 and parts.inline_attrs == []
    types = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
    for ref in parts.refs:
        assert "/" not in ref and ":" not in ref, ref  # relative to /app/, same origin
        resp = await web_client.get(f"/app/{ref}")
        assert resp.status == 200, ref
        assert resp.content_type == types[Path(ref).suffix], ref
        assert resp.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    # The modules app.js imports are served too.
    for name in ("api.js", "stream.js"):
        assert (await web_client.get(f"/app/{name}")).status == 200


async def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """Send ``target`` byte for byte (a client library would normalise it first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


TRAVERSALS = [
    "/app/../server/app.py",
    "/app/../../etc/passwd",
    "/app/..%2fserver%2fapp.py",
    "/app/%2e%2e/server/app.py",
    "/app/%2e%2e%2fserver%2fapp.py",
    "/app/%2E%2E%2Fpyproject.toml",
    "/app/.%2e/pyproject.toml",
    "/app/..%5cserver%5capp.py",
    "/app/..\\server\\app.py",
    "/app//etc/passwd",
    "/app/%2fetc%2fpasswd",
    "/app/%2Fwork%2Fpyproject.toml",
    "/app/app.js/../../server/app.py",
    "/app/....//server/app.py",
    "/app/index.html%00",
    "/app/index.html%00.js",
    "/app/.gitignore",
    "/app/%2e",
    "/app/.",
    "/app/..",
    "/app/%2e%2e",
    "/app/file:///etc/passwd",
    "/app/%252e%252e%252fserver%252fapp.py",
    "//app/../server/app.py",
    "/app/;/../server/app.py",
]


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_nothing_outside_web_is_ever_served(web_client, target):
    status, body = await raw_get(web_client.server.port, target)
    assert status in (400, 403, 404), (target, status, body[:200])
    for secret in (b"def init_app", b"root:", b"[project]", b"build-system"):
        assert secret not in body, target


def test_only_plain_known_files_directly_in_the_folder_are_loaded(tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("1")
    (tmp_path / ".env").write_text("SECRET=1")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "Upper.js").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.js").write_text("x")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.js"
    outside.write_text("x")
    (tmp_path / "link.js").symlink_to(outside)
    assert sorted(load_files(tmp_path)) == ["app.js", "index.html"]


def test_the_repository_web_folder_is_found():
    assert web_root() == WEB
    assert {"index.html", "app.js", "api.js", "stream.js", "app.css"} <= set(load_files(WEB))
