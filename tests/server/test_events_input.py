"""Bad input for ``GET /api/v1/events``: channel lists and resume cursors that are
wrong in every way we could think of answer 422 or 404 with the contract's error body,
before any stream is opened, and never 5xx."""

from __future__ import annotations

import base64

from server.keys import STREAMS
from server.sse import cursor
from tests.helpers import API, expect_error, make_channel
from tests.sse_helpers import SSEReader

EVENTS = f"{API}/events"


async def test_bad_channel_lists_are_422(client, alice):
    c = await make_channel(client, alice)
    bad = [
        "",
        " ",
        ",",
        f"{c},",
        f",{c}",
        f"{c},,{c}",
        "abc",
        f"{c},x",
        "-1",
        f"{c},-{c}",
        "0",
        "1.5",
        "1e3",
        "+1",
        "0x10",
        "9" * 20,
        "9223372036854775808",
        "\u0661",  # an Arabic-Indic digit: isdigit() but not ASCII
        "%00",
        "1;DROP TABLE channels",
        ",".join(str(i) for i in range(1, 1001)),  # 1,000 ids (3.9 KB)
        ",".join(str(i) for i in range(1, 102)),  # 101: one over HERALD_SSE_MAX_CHANNELS
    ]
    for raw in bad:
        resp = await client.get(EVENTS, params={"channels": raw}, headers=alice.headers)
        await expect_error(resp, 422, "validation_error", raw[:40])
    # 10,000 ids (49 KB) is past aiohttp's request-line limit (8190 bytes): its parser
    # refuses it with a 4xx before Herald sees it; what that answer looks like is the
    # hostile-connections work's (the contract's JSON body, no echo).
    huge = ",".join(str(i) for i in range(1, 10_001))
    resp = await client.get(EVENTS, params={"channels": huge}, headers=alice.headers)
    assert 400 <= resp.status < 500, resp.status
    assert client.app[STREAMS].opened_total == 0


async def test_repeated_ids_collapse(client, alice):
    a = await make_channel(client, alice, "a")
    b = await make_channel(client, alice, "b")
    resp = await client.get(
        EVENTS, params={"channels": f"{b},{a},{b},{b},{a}"}, headers=alice.headers
    )
    assert resp.status == 200
    ready = await SSEReader(resp.content).until("ready")
    assert ready.data["channels"] == [a, b]
    assert len(client.app[STREAMS].streams) == 1
    resp.close()
    # 100 copies of one id are one channel, not 100.
    resp = await client.get(
        EVENTS, params={"channels": ",".join([str(a)] * 100)}, headers=alice.headers
    )
    assert resp.status == 200
    assert (await SSEReader(resp.content).until("ready")).data["channels"] == [a]
    resp.close()


async def test_invisible_or_missing_channels_are_404_naming_none(client, alice, bob):
    mine = await make_channel(client, alice, "open")
    secret = await make_channel(client, bob, "secret", private=True)
    bodies = []
    for raw in (f"{secret}", f"{mine},{secret}", f"{mine},987654321", "987654321"):
        resp = await client.get(EVENTS, params={"channels": raw}, headers=alice.headers)
        error = await expect_error(resp, 404, "channel_not_found", raw)
        assert str(secret) not in error["message"] and "987654321" not in error["message"]
        bodies.append(error)
    assert all(b == bodies[0] for b in bodies)  # one answer: a secret one looks missing
    assert client.app[STREAMS].opened_total == 0


def forged(watermark: int, positions: dict[int, int], key: bytes = b"not the key") -> str:
    return cursor.encode(key, watermark, positions)


async def test_bad_cursors_are_422(client, alice, bob):
    c = await make_channel(client, alice)
    secret = await make_channel(client, bob, "secret", private=True)
    key = client.app[STREAMS].cursor_key
    good = cursor.encode(key, 0, {c: 0})
    raw_good = base64.urlsafe_b64decode(good + "=" * (-len(good) % 4))
    flipped = bytearray(raw_good)
    flipped[1] ^= 0x01
    bad = [
        "garbage",
        "!!!!!!!!",
        "a b c d",
        "AAAA",
        good[:-3],  # truncated
        good[:4],
        good + "A",
        base64.urlsafe_b64encode(bytes(flipped)).rstrip(b"=").decode(),  # payload changed
        forged(0, {secret: 0}),  # forged for a channel alice cannot see
        forged(0, {c: 0}),  # a well-formed cursor signed with another key
        "A" * 5_000,  # 5 KB (10 KB is past aiohttp's header limit, see below)
        good * 40,
        "-5",
        "1.5",
        "9" * 30,
        "curs✓r",
    ]
    for raw in bad:
        for how in ("header", "query"):
            if how == "header":
                resp = await client.get(
                    EVENTS,
                    params={"channels": str(c)},
                    headers={**alice.headers, "Last-Event-ID": raw},
                )
            else:
                resp = await client.get(
                    EVENTS, params={"channels": str(c), "last_event_id": raw}, headers=alice.headers
                )
            assert resp.status < 500, (raw[:40], how)
            await expect_error(resp, 422, "validation_error", (raw[:40], how))
    # 10 KB: past aiohttp's 8190-byte field limit; refused (4xx) before Herald sees it.
    for params, headers in (
        ({"channels": str(c)}, {**alice.headers, "Last-Event-ID": "A" * 10_240}),
        ({"channels": str(c), "last_event_id": "A" * 10_240}, alice.headers),
    ):
        resp = await client.get(EVENTS, params=params, headers=headers)
        assert 400 <= resp.status < 500, resp.status
    assert client.app[STREAMS].opened_total == 0


async def test_genuine_cursor_naming_an_invisible_channel_leaks_nothing(client, alice, bob):
    c = await make_channel(client, alice)
    secret = await make_channel(client, bob, "secret", private=True)
    for i in range(3):
        resp = await client.post(
            f"{API}/channels/{secret}/messages", json={"body": f"s{i}"}, headers=bob.headers
        )
        assert resp.status == 201
    key = client.app[STREAMS].cursor_key
    # Signed with the deployment's key (as if alice had once followed it): the cursor
    # does not widen what she may follow.
    text = cursor.encode(key, 0, {secret: 0})
    resp = await client.get(
        EVENTS,
        params={"channels": f"{c},{secret}"},
        headers={**alice.headers, "Last-Event-ID": text},
    )
    await expect_error(resp, 404, "channel_not_found")
    resp = await client.get(
        EVENTS, params={"channels": str(c)}, headers={**alice.headers, "Last-Event-ID": text}
    )
    assert resp.status == 200
    reader = SSEReader(resp.content)
    ready = await reader.until("ready")
    assert ready.data["channels"] == [c]
    mine = await client.post(
        f"{API}/channels/{c}/messages", json={"body": "x"}, headers=alice.headers
    )
    got = await reader.until("message")
    assert got.data == await mine.json()  # the first message is hers, nothing of secret
    resp.close()


async def test_access_token_in_the_url_opens_a_multichannel_stream(client, alice):
    c = await make_channel(client, alice)
    resp = await client.get(EVENTS, params={"channels": str(c), "access_token": alice.token})
    assert resp.status == 200, await resp.text()
    assert (await SSEReader(resp.content).until("ready")).data["channels"] == [c]
    resp.close()
