"""Unit tests of the SSE pieces: frames, Last-Event-ID, client IP, the manager's
bookkeeping, limits, fan-out, replay buffering, sweep (on a stand-in transport)."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace

import pytest

from server.clientip import parse_ip, resolve
from server.sse import frames
from server.sse.manager import RECONNECT_MS, RateWindow, StreamManager, tick_interval
from server.sse.replay import last_event_id
from server.sse.stream import DIRECT_WRITES, LIVE, SETUP
from server.sse.tokens import TokenWatch
from server.sse.wheel import HeartbeatWheel
from shared.bus import decode_event
from shared.errors import RetryLater, ValidationError
from shared.metrics import Metrics
from shared.services.messages import Posted
from shared.settings import Settings


class FakeTransport:
    """Stands in for an asyncio transport: records writes, holds a settable backlog."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.backlog = 0
        self.stuck_at: int | None = None  # set: the peer took nothing after this byte
        self.closing = False
        self.aborted = False
        self.writes = 0
        self.looked_at = 0  # is_closing calls: how often something checked this stream

    def is_closing(self) -> bool:
        self.looked_at += 1
        return self.closing

    def get_write_buffer_size(self) -> int:
        if self.stuck_at is not None:
            return len(self.data) - self.stuck_at
        return self.backlog

    def write(self, data: bytes) -> None:
        self.data += data
        self.writes += 1

    def abort(self) -> None:
        self.aborted = self.closing = True

    def get_extra_info(self, name: str, default=None):
        return default

    def frames(self) -> list[str]:
        """The SSE frames written (chunk framing removed)."""
        out, buf = [], bytes(self.data)
        while buf:
            size, _, rest = buf.partition(b"\r\n")
            n = int(size, 16)
            out.append(rest[:n].decode())
            buf = rest[n + 2 :]
        return out


def make_manager(**changes) -> StreamManager:
    settings = replace(Settings.from_env(env={}, dotenv=None), **changes)
    return StreamManager(settings, Metrics())


def open_live(manager, channel_id=1, user_id=1, ip="10.0.0.1"):
    transport = FakeTransport()
    stream = manager.open(channel_id=channel_id, user_id=user_id, ip=ip, transport=transport)
    manager.go_live(stream)
    return stream, transport


def sweep(manager, now: float) -> None:
    """One sweep and the end of its loop turn (the outbox writes what it queued)."""
    manager.sweep(now)
    manager.outbox.flush()


def msg(i: int, channel_id: int = 1) -> dict:
    return {"id": i, "channel_id": channel_id, "author": {"id": 1, "name": "a"}, "body": f"m{i}"}


def emit(manager, *messages: dict) -> None:
    """What a feed does with in-order messages (feeds.py is tested on its own)."""
    for m in messages:
        manager.emit(m["channel_id"], [Posted(m, m["id"] - 1)])
    manager.outbox.flush()  # the end of the loop's turn


# -- frames ---------------------------------------------------------------------------


def test_frames_exact_bytes():
    assert frames.ready("abc", 7, 15.0) == (
        b'retry: 3000\nevent: ready\ndata: {"connection_id":"abc","channel_id":7,'
        b'"heartbeat_s":15.0}\n\n'
    )
    m = frames.message({"id": 5, "body": "two\nlines ✓"})
    assert m.raw == 'event: message\nid: 5\ndata: {"id":5,"body":"two\\nlines ✓"}\n\n'.encode()
    assert m.chunked == b"%x\r\n" % len(m.raw) + m.raw + b"\r\n"
    assert frames.heartbeat(1700000000.9).raw == b'event: heartbeat\ndata: {"ts":1700000000}\n\n'
    assert frames.close("stale", 4000).raw == (
        b'retry: 4000\nevent: close\ndata: {"reason":"stale","reconnect_after_ms":4000}\n\n'
    )
    assert frames.reset(42) == b'event: reset\nid: 42\ndata: {"last_id":42}\n\n'


def test_only_message_and_reset_carry_ids():
    for raw in (frames.ready("x", 1, 1), frames.heartbeat().raw, frames.close("shutdown", 1).raw):
        assert b"\nid:" not in raw and not raw.startswith(b"id:")


# -- Last-Event-ID ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "value"), [("0", 0), ("17", 17), (" 42 ", 42), (str(2**63 - 1), 2**63 - 1)]
)
def test_last_event_id_valid(raw, value):
    assert last_event_id(raw) == value


@pytest.mark.parametrize(
    "raw",
    [
        "-1",
        "abc",
        "1.5",
        "+3",
        "1e3",
        "0x10",
        "\u0661\u0662",
        "1\x002",
        "9" * 20,
        str(2**63),
        "1 2",
        "'; --",
    ],
)
def test_last_event_id_invalid(raw):
    with pytest.raises(ValidationError) as exc:
        last_event_id(raw)
    assert exc.value.status == 422


# -- client IP --------------------------------------------------------------------------

PROXIES = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


def test_peer_address_without_trusted_proxies():
    assert resolve("203.0.113.9", ["1.2.3.4"], ()) == "203.0.113.9"
    assert resolve("::ffff:127.0.0.2", [], ()) == "127.0.0.2"
    assert resolve(None, ["1.2.3.4"], PROXIES) == "unknown"


def test_spoofed_forwarded_for_from_untrusted_peer_is_ignored():
    assert resolve("203.0.113.9", ["1.2.3.4, 10.0.0.1"], PROXIES) == "203.0.113.9"


def test_rightmost_untrusted_hop_behind_trusted_proxies():
    # The client claims 1.2.3.4; our proxies (10.x) saw it come from 198.51.100.7.
    assert resolve("10.0.0.2", ["1.2.3.4, 198.51.100.7, 10.0.0.1"], PROXIES) == "198.51.100.7"
    assert resolve("10.0.0.2", ["1.2.3.4", "198.51.100.7"], PROXIES) == "198.51.100.7"
    assert resolve("10.0.0.2", ["10.0.0.9, 10.0.0.8"], PROXIES) == "10.0.0.9"
    assert resolve("10.0.0.2", ["[2001:db8::1]:443"], PROXIES) == "2001:db8::1"
    assert resolve("10.0.0.2", ["198.51.100.7:5555"], PROXIES) == "198.51.100.7"


def test_garbage_in_forwarded_for():
    assert resolve("10.0.0.2", ["'; DROP TABLE users; --"], PROXIES) == "10.0.0.2"
    assert resolve("10.0.0.2", ["nonsense, 10.0.0.5"], PROXIES) == "10.0.0.5"
    assert resolve("10.0.0.2", ["\x00, ../../etc"], PROXIES) == "10.0.0.2"
    assert resolve("10.0.0.2", [", ".join(["10.0.0.3"] * 10_000)], PROXIES) == "10.0.0.3"
    assert parse_ip("1.2.3.4.5") is None and parse_ip("x" * 100) is None


# -- manager: limits and bookkeeping ----------------------------------------------------


async def test_limits_checked_atomically_and_counted():
    manager = make_manager(sse_max_per_ip=2, sse_max_connections=3)
    a1, _ = open_live(manager, ip="10.0.0.1")
    open_live(manager, ip="10.0.0.1")
    with pytest.raises(RetryLater) as exc:
        open_live(manager, ip="10.0.0.1")
    assert (exc.value.status, exc.value.code) == (429, "too_many_connections")
    assert exc.value.headers["Retry-After"].isdigit()
    open_live(manager, ip="10.0.0.2")
    with pytest.raises(RetryLater) as exc:
        open_live(manager, ip="10.0.0.3")
    assert (exc.value.status, exc.value.code) == (429, "server_busy")
    stats = manager.stats()
    assert stats["rejected_per_ip_total"] == 1 and stats["rejected_global_total"] == 1
    assert stats["active"] == 3 and stats["peak"] == 3 and stats["opened_total"] == 3
    manager.unregister(a1)
    manager.unregister(a1)  # twice: no double count
    assert len(manager.by_ip["10.0.0.1"]) == 1 and stats["limits"] == {"per_ip": 2, "global": 3}
    open_live(manager, ip="10.0.0.1")  # room again


async def test_per_ip_limit_forgets_streams_whose_peer_left():
    manager = make_manager(sse_max_per_ip=1)
    _, transport = open_live(manager)
    transport.closing = True  # the browser reloaded: its old connection is gone
    stream, _ = open_live(manager)
    assert list(manager.streams) == [stream.id] and manager.closed["gone"] == 1


async def test_draining_refuses_with_503():
    manager = make_manager()
    manager.draining = True
    with pytest.raises(RetryLater) as exc:
        open_live(manager)
    assert (exc.value.status, exc.value.code) == (503, "shutting_down")
    assert manager.stats()["rejected_draining_total"] == 1


def test_rate_window():
    window = RateWindow(10)
    for t in (100.1, 100.5, 101.0, 105.9):
        window.add(t)
    assert window.rate(106.0) == 0.4
    assert window.rate(110.5) == 0.2  # 100.x fell out of the window
    assert window.rate(200.0) == 0.0


def test_tick_interval_bounds():
    base = Settings.from_env(env={}, dotenv=None)
    assert tick_interval(base) == 1.0
    assert tick_interval(replace(base, sse_heartbeat_s=0.2)) == pytest.approx(0.02)
    assert tick_interval(replace(base, sse_heartbeat_s=0.01, sse_stale_s=0.01)) == 0.01


# -- manager: fan-out, replay buffer, revocation ---------------------------------------


async def test_fanout_encodes_once_and_skips_other_channels():
    manager = make_manager()
    s1, t1 = open_live(manager, channel_id=1)
    s2, t2 = open_live(manager, channel_id=1, ip="10.0.0.2")
    _, t3 = open_live(manager, channel_id=2)
    emit(manager, msg(9))
    assert t1.data == t2.data and t1.frames()[0].startswith("event: message\nid: 9\n")
    assert t3.data == b""
    assert s1.events_sent == s2.events_sent == 1
    # Malformed bus events are not events at all: the hub's decoder drops them.
    for bad in (
        {"type": "message", "channel_id": "1"},
        {"type": "message", "channel_id": 1},
        {"type": "message", "channel_id": 1, "message": {"id": "x"}},
        {"type": "message", "channel_id": 1, "message": {"id": 3, "channel_id": 2}},
        {"channel_id": 1},
        b"not json",
    ):
        assert decode_event(bad) is None
    assert len(t1.frames()) == 1


async def test_frames_of_one_turn_leave_in_one_write_and_in_order():
    manager = make_manager()
    stream, transport = open_live(manager)
    manager.outbox.direct = 0  # no direct writes left: everything queues
    for i in (1, 2, 3):
        manager.emit(1, [Posted(msg(i), i - 1)])
    assert transport.data == b"" and stream.pending() > 0  # queued, counted as pending
    manager.outbox.flush()
    ids = [json.loads(f.split("data: ")[1])["id"] for f in transport.frames()]
    assert ids == [1, 2, 3] and transport.writes == 1 and stream.events_sent == 3
    # A close goes after what is queued, at once.
    manager.emit(1, [Posted(msg(4), 3)])
    manager.close(stream, "shutdown")
    assert transport.writes == 3 and "id: 4" in transport.frames()[-2]
    assert "event: close" in transport.frames()[-1]
    manager.outbox.flush()
    assert transport.writes == 3


async def test_an_idle_outbox_writes_the_first_slice_at_once_then_queues():
    manager = make_manager(sse_max_per_ip=500, sse_max_connections=500)
    live = [open_live(manager) for _ in range(DIRECT_WRITES + 2)]
    manager.emit(1, [Posted(msg(1), 0)])
    written = [t for _, t in live if t.writes]
    assert len(written) == DIRECT_WRITES  # at once, during the fan-out loop
    assert manager.outbox.scheduled and len(manager.outbox.streams) == 2
    manager.outbox.write_slice()  # the pass empties the queue: the budget is back
    assert all(t.writes == 1 for _, t in live) and manager.outbox.direct == DIRECT_WRITES
    # A stream with frames still queued never jumps its queue with a direct write.
    manager.outbox.direct = 0
    manager.emit(1, [Posted(msg(2), 1)])
    manager.outbox.direct = DIRECT_WRITES
    manager.emit(1, [Posted(msg(3), 2)])
    manager.outbox.flush()
    for stream, t in live:
        ids = [json.loads(f.split("data: ")[1])["id"] for f in t.frames()]
        assert ids == [1, 2, 3] and t.writes == 2 and stream.queued is None


async def test_only_the_peers_backlog_makes_a_slow_consumer_not_our_queue():
    manager = make_manager(sse_buffer_bytes=2048)
    stream, transport = open_live(manager)
    big = {**msg(1), "body": "x" * 1200}
    manager.emit(1, [Posted(big, 0)])
    manager.emit(1, [Posted({**big, "id": 2}, 1)])  # both still queued: our own delay
    assert stream.close_reason is None
    manager.outbox.flush()
    transport.backlog = 1500  # the peer took none of it
    manager.emit(1, [Posted({**big, "id": 3}, 2)])
    assert stream.close_reason == "slow_consumer"


async def test_setup_buffers_then_go_live_skips_replayed_and_older():
    manager = make_manager()
    transport = FakeTransport()
    stream = manager.open(channel_id=1, user_id=1, ip="10.0.0.1", transport=transport)
    assert stream.state == SETUP
    emit(manager, msg(4), msg(5), msg(6), msg(7))
    assert transport.data == b""  # nothing written during SETUP
    stream.sent_id = 6  # the replay sent up to 6 (the feed's order makes one id enough)
    manager.go_live(stream)
    assert stream.state == LIVE
    emit(manager, msg(8))
    ids = [json.loads(f.split("data: ")[1])["id"] for f in transport.frames()]
    assert ids == [7, 8]


async def test_setup_buffer_is_bounded():
    manager = make_manager(sse_buffer_bytes=2048)
    stream = manager.open(channel_id=1, user_id=1, ip="10.0.0.1", transport=FakeTransport())
    big = {**msg(1), "body": "x" * 1500}
    emit(manager, big)
    assert stream.close_reason is None
    emit(manager, {**big, "id": 2})
    assert stream.close_reason == "slow_consumer" and manager.slow_consumer_total == 1


async def test_revoke_closes_only_that_users_streams_on_that_channel():
    manager = make_manager()
    target, t1 = open_live(manager, channel_id=1, user_id=7)
    same_user_other_channel, t2 = open_live(manager, channel_id=2, user_id=7)
    other_user, t3 = open_live(manager, channel_id=1, user_id=8)
    manager.on_event(decode_event({"type": "revoke", "channel_id": 1, "user_id": 7}))
    assert target.close_reason == "revoked" and target.done.done()
    assert "event: close" in t1.frames()[-1] and '"reason":"revoked"' in t1.frames()[-1]
    assert same_user_other_channel.close_reason is None and other_user.close_reason is None
    assert t2.data == t3.data == b""
    manager.on_event(decode_event({"type": "channel_deleted", "channel_id": 2}))
    assert same_user_other_channel.close_reason == "revoked"


def open_with_token(manager, token_id, expires_at=None, ip="10.0.0.1"):
    transport = FakeTransport()
    stream = manager.open(
        channel_id=1,
        user_id=1,
        ip=ip,
        transport=transport,
        token_id=token_id,
        token_expires_at=expires_at,
    )
    manager.go_live(stream)
    return stream


async def test_token_watch_closes_by_token_and_by_due_expiry_only():
    manager = make_manager(sse_max_per_ip=100)
    watch = TokenWatch(manager=manager, users=None, timeout_s=1.0)
    first = [open_with_token(manager, 1, expires_at=100.0) for _ in range(3)]
    later = [open_with_token(manager, 2, expires_at=200.0) for _ in range(2)]
    forever = open_with_token(manager, 3)
    assert sorted(manager.by_token) == [1, 2, 3] and len(manager.expiring) == 5
    assert watch.expire(99.9) == 0
    assert watch.expire(100.0) == 3
    assert all(s.close_reason == "revoked" for s in first)
    assert all(s.close_reason is None for s in [*later, forever])
    # A stream that ended before its token expired is skipped, not closed twice.
    manager.gone(later[0])
    assert watch.expire(500.0) == 1 and later[1].close_reason == "revoked"
    assert manager.expiring == [] and forever.close_reason is None
    assert watch.close_token(3) == 1 and forever.close_reason == "revoked"
    assert watch.close_token(3) == 0  # already closing: not counted again
    for s in [*first, *later, forever]:
        manager.unregister(s)
    assert manager.by_token == {}


async def test_expiry_heap_drops_ended_streams_entries_before_it_outgrows_the_registry():
    manager = make_manager(sse_max_per_ip=1000)
    for i in range(500):
        manager.unregister(open_with_token(manager, i + 1, expires_at=1e12))
    kept = open_with_token(manager, 9999, expires_at=1e12)
    assert len(manager.expiring) <= 2 * len(manager.streams) + 64 + 1
    assert any(e[2] is kept for e in manager.expiring)


# -- manager: the sweep ------------------------------------------------------------------


async def test_sweep_heartbeats_when_due():
    manager = make_manager(sse_heartbeat_s=10)
    stream, transport = open_live(manager)
    now = stream.next_heartbeat
    sweep(manager, now - 0.5)
    assert transport.data == b""
    sweep(manager, now)
    assert transport.frames()[0].startswith('event: heartbeat\ndata: {"ts":')
    sweep(manager, now + 5)
    assert len(transport.frames()) == 1
    sweep(manager, now + 10)
    assert len(transport.frames()) == 2


async def test_sweep_stale_then_dropped_after_grace():
    manager = make_manager(sse_heartbeat_s=1, sse_stale_s=3)
    stream, transport = open_live(manager)
    t0 = stream.next_heartbeat
    sweep(manager, t0)  # heartbeat written...
    transport.stuck_at = 0  # ...and never taken by the peer
    sweep(manager, t0 + 1)
    sweep(manager, t0 + 2)
    assert stream.close_reason is None
    sweep(manager, t0 + 3.01)
    assert stream.close_reason == "stale" and stream.stale
    stats = manager.stats()
    assert stats["stale_detected_total"] == 1 and stats["stale_active"] == 1
    lo, hi = RECONNECT_MS["stale"]
    assert lo <= stream.reconnect_after_ms <= hi
    sweep(manager, stream.closing_deadline + 0.01)
    assert transport.aborted
    manager.unregister(stream)
    assert manager.stats()["stale_active"] == 0 and manager.closed["stale"] == 1


async def test_progress_is_not_stale():
    manager = make_manager(sse_heartbeat_s=1, sse_stale_s=2)
    stream, transport = open_live(manager)
    t0 = stream.next_heartbeat
    transport.backlog = 1000
    sweep(manager, t0)
    for step in range(1, 8):
        transport.backlog -= 100  # a slow reader, still reading
        sweep(manager, t0 + step)
    assert stream.close_reason is None


async def test_slow_consumer_on_write_and_on_sweep():
    manager = make_manager(sse_buffer_bytes=1024)
    stream, transport = open_live(manager)
    transport.backlog = 1000
    emit(manager, msg(1))
    assert stream.close_reason == "slow_consumer"
    assert '"reason":"slow_consumer"' in transport.frames()[-1]
    other, t2 = open_live(manager, ip="10.0.0.9")
    emit(manager, msg(2))
    t2.backlog = 5000  # the kernel and our buffer hold more than the bound
    sweep(manager, other.next_heartbeat - 1)
    assert other.close_reason == "slow_consumer" and manager.slow_consumer_total == 2


async def test_an_idle_handed_over_stream_is_looked_at_once_per_heartbeat_not_per_tick():
    manager = make_manager(sse_heartbeat_s=10, sse_stale_s=30, sse_max_per_ip=100)
    opened = [open_live(manager, ip=f"10.0.1.{i}") for i in range(50)]
    for stream, _ in opened:
        stream.detach()  # aiohttp let go: the connection's end reaches the manager itself
    t0 = max(s.next_heartbeat for s, _ in opened)
    tick = manager.tick_s
    sweep(manager, t0 - 9.5)  # the streams aiohttp held are checked once more, then not
    assert not manager.watched
    before = [t.looked_at for _, t in opened]
    steps = 0
    now = t0 - 9.5
    while now + tick < t0 - 0.5:  # eight one-second ticks with no heartbeat due
        now += tick
        steps += 1
        sweep(manager, now)
    assert steps == 8 and [t.looked_at for _, t in opened] == before
    sweep(manager, t0)  # every heartbeat due: each stream written once, then watched
    assert all(len(t.frames()) == 1 for _, t in opened)
    assert len(manager.watched) == 50
    sweep(manager, t0 + tick)  # delivered (no backlog): clean, no longer watched
    assert not manager.watched
    assert len(manager.wheel) == 50
    for stream, _ in opened:
        manager.unregister(stream)
    assert len(manager.wheel) == 0


async def test_a_stalled_stream_is_watched_until_stale_even_between_heartbeats():
    manager = make_manager(sse_heartbeat_s=10, sse_stale_s=3)
    stream, transport = open_live(manager)
    stream.detach()
    t0 = stream.next_heartbeat
    transport.stuck_at = 0  # the peer takes nothing from here on
    sweep(manager, t0)
    sweep(manager, t0 + 2.9)
    assert stream.close_reason is None and stream in manager.watched
    sweep(manager, t0 + 3.0)
    assert stream.close_reason == "stale"


def test_heartbeat_wheel_turns_due_slots_only():
    wheel = HeartbeatWheel(0.5)

    class S:  # only next_heartbeat matters to the wheel
        def __init__(self, at: float) -> None:
            self.next_heartbeat = at

    a, b, c = S(10.2), S(10.7), S(30.0)
    for s in (a, b, c):
        wheel.add(s)
    assert wheel.turn(9.9) == []
    assert wheel.turn(10.0) == [a]  # its slot; the caller files it back until due
    wheel.add(a)
    assert wheel.turn(10.3) == [a]
    assert wheel.turn(10.6) == [b]
    wheel.discard(c)
    assert wheel.turn(1000.0) == [] and wheel.slots == {}  # long gap: only slots held
    late = S(20.0)  # behind the last turn: filed where the next turn looks
    wheel.add(late)
    assert wheel.turn(1000.1) == [late]
    d = S(5.0)
    wheel.add(d)
    assert wheel.turn(3.0) == []  # the clock went back (tests): slots up to it only
    assert wheel.turn(1001.0) == [d]


async def test_sweep_drops_vanished_peers():
    manager = make_manager()
    stream, transport = open_live(manager)
    transport.closing = True
    sweep(manager, 0.0)
    assert manager.streams == {} and stream.done.done() and manager.closed["gone"] == 1


async def test_a_stream_written_after_it_ended_leaves_the_watched_set():
    """A replay page written (note_write) after the peer left and the stream was
    unregistered must not keep the stream watched, and held, for the process's life."""
    manager = make_manager()
    transport = FakeTransport()
    stream = manager.open(channel_id=1, user_id=1, ip="10.0.0.1", transport=transport)
    manager.note_write(stream)
    sweep(manager, 1.0)  # delivered: clean
    transport.closing = True
    sweep(manager, 2.0)  # gone: unregistered
    assert manager.streams == {} and stream not in manager.watched
    manager.note_write(stream)  # the replay's next page, already too late
    manager.unregister(stream)  # the handler's end
    assert stream not in manager.watched
    manager.note_write(stream)  # and written again after that
    sweep(manager, 3.0)
    assert stream not in manager.watched
    assert all(stream not in slot for slot in manager.wheel.slots.values())
