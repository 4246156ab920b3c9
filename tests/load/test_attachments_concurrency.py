"""100 concurrent mixed operations on two server processes, with an orphan scan (grace 0)
running through them: disk and database end in agreement, nothing 5xx, nothing lost."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import replace

from shared.metrics import Metrics
from shared.services.audit import AuditTrail
from shared.services.wiring import attachment_files
from tests.attachment_helpers import audit_rows, files_on_disk, upload
from tests.helpers import API, make_channel


async def test_mixed_operations_keep_disk_and_database_in_agreement(
    client, make_client, alice, settings, db
):
    second = await make_client()
    servers = [client, second]
    channel = await make_channel(client, alice)
    rng = random.Random(5)
    contents: dict[int, bytes] = {}
    for i in range(30):
        data = rng.randbytes(rng.randint(0, 50_000)) + b"%d" % i
        resp = await upload(client, alice, channel, data)
        assert resp.status == 201
        contents[(await resp.json())["id"]] = data
    existing = list(contents)
    rng.shuffle(existing)
    to_delete = existing[:20]  # 10 single deletes, 10 double deletes
    to_read = existing[10:30]  # overlaps the deleted ones on purpose

    statuses: list[int] = []
    delete_results: dict[int, list[int]] = defaultdict(list)
    new_uploads: dict[int, bytes] = {}

    async def do_upload(i: int) -> None:
        data = rng.randbytes(rng.randint(0, 80_000)) + b"new%d" % i
        resp = await upload(servers[i % 2], alice, channel, data, filename=f"n{i}.bin")
        statuses.append(resp.status)
        if resp.status == 201:
            new_uploads[(await resp.json())["id"]] = data

    async def do_download(att_id: int, i: int) -> None:
        resp = await servers[i % 2].get(
            f"{API}/attachments/{att_id}/content", headers=alice.headers
        )
        statuses.append(resp.status)
        if resp.status == 200:
            assert await resp.read() == contents[att_id]  # whole or not at all

    async def do_delete(att_id: int, i: int) -> None:
        resp = await servers[i % 2].delete(f"{API}/attachments/{att_id}", headers=alice.headers)
        statuses.append(resp.status)
        delete_results[att_id].append(resp.status)

    ops = [do_upload(i) for i in range(40)]
    ops += [do_download(a, i) for i, a in enumerate(to_read)]
    ops += [do_download(a, i + 1) for i, a in enumerate(to_read[:10])]
    ops += [do_delete(a, i) for i, a in enumerate(to_delete)]
    ops += [do_delete(a, i + 1) for i, a in enumerate(to_delete[10:])]
    assert len(ops) == 100
    rng.shuffle(ops)

    scanner = attachment_files(
        db=db,
        settings=replace(settings, orphan_grace_s=0),
        metrics=Metrics(),
        audit=AuditTrail(db=db),
    ).orphans

    finished = asyncio.Event()
    scan_runs: list[dict] = []

    async def scans() -> None:
        # Back to back for as long as the operations run (at least once).
        while True:
            scan_runs.append(await scanner.scan())
            if finished.is_set():
                return

    async def operations() -> None:
        await asyncio.gather(*ops)
        finished.set()

    await asyncio.gather(operations(), scans())
    assert all(run.get("deleted", 0) == 0 for run in scan_runs)

    counts = Counter(statuses)
    assert all(s < 500 for s in statuses), counts
    assert set(counts) <= {200, 201, 204, 404}, counts
    assert counts[201] == 40
    for att_id, results in delete_results.items():
        assert sorted(results).count(204) == 1, (att_id, results)
        assert all(r in (204, 404) for r in results)

    # Disk and database agree: every active row has its file, byte for byte, and every
    # file belongs to an active row. Nothing is left half-way.
    rows = await db.fetch("SELECT id, storage_key, state, sha256 FROM attachments")
    active = {r["storage_key"]: r for r in rows if r["state"] == "active"}
    assert {r["state"] for r in rows} <= {"active", "deleted"}
    assert files_on_disk(settings.upload_dir) == set(active)
    assert not any((settings.upload_dir / ".tmp").iterdir())
    everything = {**contents, **new_uploads}
    for key, row in active.items():
        data = (settings.upload_dir / key).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        assert data == everything[row["id"]]
    assert len(active) == 30 - 20 + 40
    deleted_ids = {r["id"] for r in rows if r["state"] == "deleted"}
    assert deleted_ids == set(to_delete)
    audited = Counter(int(r["target_id"]) for r in await audit_rows(db, "attachment.delete"))
    assert audited == Counter({a: 1 for a in to_delete})
    assert (await AuditTrail(db=db).verify()).ok
