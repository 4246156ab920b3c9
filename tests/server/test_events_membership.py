"""``GET /api/v1/events`` over the API as memberships change: a membership stream
(no ``channels``) follows joins (``subscribed``, then the channel's messages) and
removals (``unsubscribed``, the stream stays open); a chosen-channels stream drops a
removed channel and closes ``revoked`` when none is left; the cursor stays within 512
characters at 100 busy channels and resumes every one of them."""

from __future__ import annotations

import re

from server.keys import STREAMS
from tests.helpers import API, make_channel
from tests.sse_helpers import Event, SSEReader

CURSOR = re.compile(r"^[\x21-\x7e]{1,512}$")


async def post(client, user, channel_id, body) -> dict:
    resp = await client.post(
        f"{API}/channels/{channel_id}/messages", json={"body": body}, headers=user.headers
    )
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def next_event(reader: SSEReader, timeout: float = 5.0) -> Event:
    """The next frame that a browser dispatches, skipping heartbeats and cursors."""
    while True:
        ev = await reader.next(timeout)
        assert ev is not None, "the stream ended"
        if ev.event not in ("heartbeat", "id"):
            return ev


async def add(client, owner, channel_id, user) -> None:
    resp = await client.post(
        f"{API}/channels/{channel_id}/members", json={"user_id": user.id}, headers=owner.headers
    )
    assert resp.status == 204, await resp.text()


async def remove(client, owner, channel_id, user) -> None:
    resp = await client.delete(
        f"{API}/channels/{channel_id}/members/{user.id}", headers=owner.headers
    )
    assert resp.status == 204, await resp.text()


async def test_membership_stream_follows_joins_and_removals(client, alice, bob):
    home = await make_channel(client, bob, "home")  # bob's own: he is its member
    club = await make_channel(client, alice, "club", private=True)
    resp = await client.get(f"{API}/events", headers=bob.headers)
    assert resp.status == 200
    reader = SSEReader(resp.content)
    ready = await reader.until("ready")
    assert ready.data["channels"] == [home]
    before = await post(client, alice, club, "before bob joined")

    await add(client, alice, club, bob)
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("subscribed", {"channel_id": club})
    first = await post(client, alice, club, "welcome")
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("message", first)
    assert before["id"] < first["id"]  # what came before the join is not sent

    await remove(client, alice, club, bob)
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("unsubscribed", {"channel_id": club, "reason": "revoked"})
    await post(client, alice, club, "bob cannot see this")
    mine = await post(client, bob, home, "still here")
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("message", mine)  # open, and nothing of club

    # A deleted channel drops too, and the stream stays open with none left.
    resp_del = await client.delete(f"{API}/channels/{home}", headers=bob.headers)
    assert resp_del.status == 204
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("unsubscribed", {"channel_id": home, "reason": "revoked"})
    assert len(client.app[STREAMS].streams) == 1
    again = await make_channel(client, alice, "again")
    await add(client, alice, again, bob)
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("subscribed", {"channel_id": again})
    resp.close()


async def test_chosen_stream_drops_removed_channels_then_closes(client, alice, bob):
    a = await make_channel(client, alice, "a", private=True)
    b = await make_channel(client, alice, "b", private=True)
    for c in (a, b):
        await add(client, alice, c, bob)
    resp = await client.get(f"{API}/events", params={"channels": f"{a},{b}"}, headers=bob.headers)
    assert resp.status == 200
    reader = SSEReader(resp.content)
    assert (await reader.until("ready")).data["channels"] == [a, b]

    await remove(client, alice, a, bob)
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("unsubscribed", {"channel_id": a, "reason": "revoked"})
    await post(client, alice, a, "gone for bob")
    in_b = await post(client, alice, b, "still b")
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("message", in_b)

    await remove(client, alice, b, bob)
    ev = await next_event(reader)
    assert (ev.event, ev.data) == ("unsubscribed", {"channel_id": b, "reason": "revoked"})
    ev = await next_event(reader)
    assert ev.event == "close" and ev.data["reason"] == "revoked"
    assert ev.retry == ev.data["reconnect_after_ms"]
    assert await reader.next() is None  # the server ended the response
    resp.close()


async def test_cursor_fits_512_at_100_busy_channels_and_resumes_them(client, alice):
    channels = [await make_channel(client, alice, f"c{i}") for i in range(100)]
    query = {"channels": ",".join(map(str, channels))}
    streams = {
        "chosen": await client.get(f"{API}/events", params=query, headers=alice.headers),
        "members": await client.get(f"{API}/events", headers=alice.headers),
    }
    readers = {}
    for name, resp in streams.items():
        assert resp.status == 200, name
        readers[name] = SSEReader(resp.content)
        assert len((await readers[name].until("ready")).data["channels"]) == 100
    posted = [await post(client, alice, c, f"in {c}") for c in channels]
    last: dict[str, str] = {}
    for name, reader in readers.items():
        got, cursors = [], []
        while len(got) < len(posted) or not cursors or cursors[-1][1] < len(posted):
            ev = await reader.next()
            assert ev is not None
            if ev.event == "message":
                assert ev.id is None  # the shared frame carries no id of its own
                got.append(ev.data["id"])
            elif ev.event == "id":
                cursors.append((ev.id, len(got)))
        assert got == [m["id"] for m in posted], name
        for text, _ in cursors:
            assert isinstance(text, str) and CURSOR.match(text), (name, text)
        print(f"{name}: {len(cursors)} cursors, longest {max(len(t) for t, _ in cursors)}")
        streams[name].close()
        last[name] = cursors[-1][0]
    # Three more while both are away; the last cursor resumes all 100 channels at once.
    later = [await post(client, alice, c, "later") for c in channels[::40]]
    again = {}
    for name in readers:
        resp = await client.get(
            f"{API}/events",
            params=query if name == "chosen" else {},
            headers={**alice.headers, "Last-Event-ID": last[name]},
        )
        assert resp.status == 200
        again[name] = (resp, SSEReader(resp.content))
        await again[name][1].until("ready")
        replayed = [(await again[name][1].until("message")).data["id"] for _ in later]
        assert replayed == [m["id"] for m in later], name
    fresh = await post(client, alice, channels[7], "live")
    for name, (resp, reader) in again.items():
        assert (await reader.until("message")).data == fresh, name  # nothing twice before it
        resp.close()
