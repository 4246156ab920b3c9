"""Prometheus side of operations: both processes' /metrics pass ``promtool check
metrics``; the alert rules load and pass their unit tests (deploy/prometheus/); every
metric the rules and the Grafana dashboard (deploy/grafana/herald.json) name exists in
what the server and the worker export; every alert has a runbook entry."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families

from shared.constants import JOB_CLEANUP_DELAYED
from shared.metrics import Metrics
from tests.helpers import API, make_channel
from tests.sse_helpers import SSEReader
from worker.app import build_worker
from worker.observe import ArqFigures, observe_app

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "herald.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian: apt-get install prometheus)"
)


async def server_metrics(client: TestClient, alice) -> str:
    """The server's /metrics after traffic that makes its labelled families appear."""
    channel_id = await make_channel(client, alice)
    post = await client.post(
        f"{API}/channels/{channel_id}/messages", json={"body": "hi"}, headers=alice.headers
    )
    assert post.status == 201
    delayed = await client.post(
        f"{API}/channels/{channel_id}/delayed-messages",
        json={"body": "later", "delay_seconds": 3600},
        headers=alice.headers,
    )
    assert delayed.status == 202
    stream = await client.get(f"{API}/channels/{channel_id}/events", headers=alice.headers)
    await SSEReader(stream.content).until("ready")
    assert (await client.get("/no/such/route")).status == 404
    assert (await client.get("/health")).status == 200  # refreshes the queue figures
    text = await (await client.get("/metrics")).text()
    stream.close()
    return text


async def worker_metrics(settings, redis) -> str:
    """A worker's /metrics after it ran a job. No cron jobs: a burst worker waits for
    deferred jobs, and the delivery tick defers itself while delayed messages wait."""
    metrics = Metrics()
    worker = build_worker(
        settings, metrics=metrics, burst=True, handle_signals=False, poll_delay=0.05, cron_jobs=[]
    )
    metrics.registry.register(ArqFigures(worker))
    client = TestClient(TestServer(observe_app(worker, metrics)))
    await client.start_server()
    try:
        arq = ArqRedis(connection_pool=redis.connection_pool)
        await arq.enqueue_job("ping", _queue_name=worker.queue_name)
        # A cleanup run, so the server's shared cleanup figures have a last run.
        await arq.enqueue_job(JOB_CLEANUP_DELAYED, _queue_name=worker.queue_name)
        await worker.main()
        return await (await client.get("/metrics")).text()
    finally:
        await worker.close()
        await client.close()


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, cwd=RULES, timeout=60
    )


@needs_promtool
async def test_server_metrics_pass_promtool(client, alice):
    done = promtool("check", "metrics", stdin=await server_metrics(client, alice))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
async def test_worker_metrics_pass_promtool(settings, redis):
    done = promtool("check", "metrics", stdin=await worker_metrics(settings, redis))
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_alert_rules_load_and_pass_their_unit_tests():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


# No YAML library in the project: the two files are ours, in a fixed layout, and
# promtool (above) is what checks them as YAML.
def alert_rules() -> list[dict[str, str]]:
    """``[{alert, expr, runbook}]`` from alerts.yml (``expr:`` inline or a ``>`` block)."""
    rules: list[dict[str, str]] = []
    lines = (RULES / "alerts.yml").read_text().splitlines()
    for i, line in enumerate(lines):
        key, _, value = line.strip().partition(": ")
        if key == "- alert":
            rules.append({"alert": value})
        elif key == "expr" and value == ">":
            indent = len(line) - len(line.lstrip())
            block = []
            for more in lines[i + 1 :]:
                if more.strip() and len(more) - len(more.lstrip()) <= indent:
                    break
                block.append(more.strip())
            rules[-1]["expr"] = " ".join(block)
        elif key == "expr":
            rules[-1]["expr"] = value
        elif key == "runbook":
            rules[-1]["runbook"] = value.strip('"')
    return rules


def firing_in_tests() -> set[str]:
    """Alert names that some case of alerts_test.yml expects to fire."""
    text = (RULES / "alerts_test.yml").read_text()
    cases = re.findall(
        r"alertname: (\w+)\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time|\n  - name|\Z)", text, re.DOTALL
    )
    return {name for name, body in cases if "exp_labels" in body}


def test_every_alert_has_a_unit_test_and_a_runbook_entry():
    tested = firing_in_tests()
    headings = {
        re.sub(r"[^a-z0-9-]", "", line[4:].strip().lower().replace(" ", "-"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("### ")
    }
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) >= 14 and len(set(names)) == len(names)
    for rule in alert_rules():
        name = rule["alert"]
        assert name in tested, f"{name} is never shown firing in alerts_test.yml"
        anchor = rule["runbook"].partition("#")[2]
        assert anchor == name.lower() and anchor in headings, f"no runbook entry for {name}"


# PromQL words that look like names but are not metrics.
KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "bool",
    "offset",
    "group_left",
    "group_right",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, labels, keywords left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        name, rest = match.group(0), text[match.end() :].lstrip()
        if rest.startswith("(") or name in KEYWORDS:
            continue
        names.add(name)
    return names


def exported(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_metric_names_are_extracted_from_promql():
    expr = (
        'sum by (le, route) (rate(herald_http_request_duration_seconds_bucket{route="/x"}[5m]))'
        ' / ignoring(kind) herald_sse_limit{kind="global"} or time() - up > 0'
    )
    assert metric_names(expr) == {
        "herald_http_request_duration_seconds_bucket",
        "herald_sse_limit",
        "up",
    }


async def test_dashboard_and_rules_name_only_exported_metrics(client, alice, settings, redis):
    # The worker first: the server's delayed message queues a job deferred by an hour,
    # which a burst worker would wait for.
    known = exported(await worker_metrics(settings, redis))
    known |= exported(await server_metrics(client, alice))
    known.add("up")  # Prometheus's own, per scrape target
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    exprs += [rule["expr"] for rule in alert_rules()]
    used = set().union(*(metric_names(e) for e in exprs))
    assert "herald_http_requests_total" in used and "herald_worker_jobs_total" in used
    assert not used - known, f"not exported by either process: {sorted(used - known)}"
    # And the unit tests feed the rules series that exist, so they test something real.
    text = (RULES / "alerts_test.yml").read_text()
    series = set(re.findall(r"- series: '([a-z_:]+)\{", text))
    assert len(series) >= 15
    assert not series - known, sorted(series - known)
