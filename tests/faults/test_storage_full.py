"""The upload directory full (a 1 MiB tmpfs) or read-only (a tmpfs mounted ``ro``): the
upload answers 507 ``insufficient_storage`` with the contract's JSON body, and leaves
no file (temporary or placed) and no row behind. Real mounts (``mount -t tmpfs`` works
as root here); no fake ``os.write`` was needed.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from server.keys import DB, USERS
from tests.helpers import API


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join(["size=1m", *options]), "tmpfs", str(path)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"tmpfs cannot be mounted here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def files_below(root: Path) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]


@pytest.mark.parametrize("kind", ["full", "read_only"])
async def test_upload_to_a_full_or_read_only_folder_is_507(make_client, tmp_path, kind):
    options = ("ro",) if kind == "read_only" else ()
    with tmpfs(tmp_path / "uploads", *options) as folder:
        client = await make_client(upload_dir=folder)
        _, token = await client.app[USERS].create("alice")
        headers = {"Authorization": f"Bearer {token}"}
        made = await client.post(f"{API}/channels", json={"name": "c"}, headers=headers)
        url = f"{API}/channels/{(await made.json())['id']}/attachments"

        async def upload(data: bytes) -> aiohttp.ClientResponse:
            fd = aiohttp.FormData()
            # A file object: aiohttp warns about (and the suite errors on) big raw bytes.
            fd.add_field("file", io.BytesIO(data), filename="big.bin")
            return await client.post(url, data=fd, headers=headers)

        resp = await upload(os.urandom(2 * 1024 * 1024))  # twice the folder's size
        text = await resp.text()
        assert resp.status == 507, text[:500]
        body = await resp.json()
        assert body["error"]["code"] == "insufficient_storage"
        assert "Traceback" not in text and str(folder) not in text
        assert files_below(folder) == []
        assert await client.app[DB].fetchval("SELECT count(*) FROM attachments") == 0
        # Room again (a folder that is neither full nor read-only): uploads work.
        if kind == "full":
            small = await upload(b"fits")
            assert small.status == 201, (await small.text())[:500]
