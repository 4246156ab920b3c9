"""/metrics as a scraper sees it: request counts by route template and status class,
the latency histogram, messages posted, build info and the standard collectors."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from server.keys import METRICS
from tests.helpers import API, make_channel
from tests.sse_helpers import SSEReader


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


async def scrape(client) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return await resp.text()


async def test_requests_are_counted_by_route_template_and_status_class(client, alice):
    channel_id = await make_channel(client, alice)
    assert (await client.get(f"{API}/channels/{channel_id}", headers=alice.headers)).status == 200
    assert (await client.get(f"{API}/channels/999999", headers=alice.headers)).status == 404
    assert (await client.get(f"{API}/channels/{channel_id}")).status == 401
    assert (await client.get("/no/such/route")).status == 404
    assert (await client.put(f"{API}/channels", headers=alice.headers)).status == 405
    text = await scrape(client)
    detail = f"{API}/channels/{{channel_id}}"
    total = "herald_http_requests_total"
    assert value(text, total, method="GET", route=detail, status="2xx") == 1
    assert value(text, total, method="GET", route=detail, status="4xx") == 2
    assert value(text, total, method="POST", route=f"{API}/channels", status="2xx") == 1
    assert value(text, total, method="GET", route="(unmatched)", status="4xx") == 1
    assert value(text, total, method="PUT", route="(unmatched)", status="4xx") == 1
    # No label carries the id a client typed.
    # (Label values only: a sample's value, a float, may hold any digits.)
    labels = re.findall(r'="([^"]*)"', text)
    assert not any("999999" in v for v in labels)
    assert str(channel_id) not in re.findall(r'route="[^"]*"', text)
    count = "herald_http_request_duration_seconds_count"
    assert value(text, count, route=detail) == 3
    assert value(text, "herald_http_request_duration_seconds_bucket", route=detail, le="+Inf") == 3


async def test_an_odd_method_does_not_become_a_label(client):
    resp = await client.request("PROPFIND", "/health")
    assert resp.status == 405
    text = await scrape(client)
    assert "PROPFIND" not in text
    assert (
        value(text, "herald_http_requests_total", method="other", route="(unmatched)", status="4xx")
        == 1
    )


async def test_a_server_error_is_counted_as_5xx(client, monkeypatch):
    def broken() -> bytes:
        raise RuntimeError("boom")

    # /metrics itself fails now; the error middleware answers 500 and that is counted.
    monkeypatch.setattr(client.app[METRICS], "render", broken)
    assert (await client.get("/metrics")).status == 500
    monkeypatch.undo()
    text = await scrape(client)
    assert (
        value(text, "herald_http_requests_total", method="GET", route="/metrics", status="5xx") == 1
    )


async def test_an_event_stream_is_counted_and_timed_once_open(client, alice):
    channel_id = await make_channel(client, alice)
    stream = await client.get(f"{API}/channels/{channel_id}/events", headers=alice.headers)
    await SSEReader(stream.content).until("ready")
    route = f"{API}/channels/{{channel_id}}/events"
    text = await scrape(client)
    assert value(text, "herald_http_requests_total", method="GET", route=route, status="2xx") == 1
    assert value(text, "herald_http_request_duration_seconds_count", route=route) == 1
    stream.close()


async def test_posted_messages_build_info_and_standard_collectors(client, alice):
    channel_id = await make_channel(client, alice)
    for body in ("one", "two"):
        resp = await client.post(
            f"{API}/channels/{channel_id}/messages", json={"body": body}, headers=alice.headers
        )
        assert resp.status == 201
    text = await scrape(client)
    assert value(text, "herald_messages_posted_total", source="rest") == 2
    (build,) = [k for k in samples(text) if k[0] == "herald_build_info"]
    version = dict(build[1])["version"]
    assert version and version != "unknown"
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert any(k[0] == name for k in samples(text)), name


async def test_no_precomputed_rates_and_no_sql_in_labels(client, alice):
    await make_channel(client, alice)
    await client.get("/health")
    text = await scrape(client)
    for gone in (
        "herald_sse_new_per_second",
        "herald_delayed_queue_growth_per_minute",
        "herald_delayed_queue_avg_size",
        "herald_db_statement_info",
    ):
        assert gone not in text, gone
    statements = {dict(k[1]).get("statement") for k in samples(text)} - {None}
    assert statements and all(re.fullmatch(r"[a-z]+_[0-9a-f]{10}", s) for s in statements)
    assert "SELECT" not in text.upper().replace("SELECT_", "")
