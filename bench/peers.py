"""Herald against its peers: Nchan (nginx), the stock aiohttp-sse pattern, and Herald.

    .venv/bin/python -m bench.peers            # 1,000 streams, two runs, ~5 min
    .venv/bin/python -m bench.peers --quick    # one run, short windows, ~1.5 min
    .venv/bin/python -m bench.peers --sizes 1000,5000,10000   # KB per stream at each
    .venv/bin/python -m bench.peers --processes 2   # also `herald serve --processes 2`

Every peer is driven by the same client code (bench/sse.py's client processes: two of
them, each holding half the streams, so one client's CPU is not the ceiling) and measured
the same way: RSS and CPU time of the server's whole process tree from /proc. Peers run
interleaved (nchan, stock, herald, nchan, ...), each in a fresh process, and the table
shows medians over the runs with Herald's ratio to Nchan beside the issue's target.

Nchan runs as ``nginx -c CONF -p PREFIX`` from a temporary prefix (worker_processes 1);
without nginx and its nchan module the bench installs them with apt-get where it can
(root, apt present; ``--no-install`` to never try) and otherwise skips Nchan, saying so.
Herald needs PostgreSQL and Redis as for bench/sse.py (HERALD_BENCH_PG,
HERALD_BENCH_REDIS); its posts are real REST posts, committed to PostgreSQL first.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.sse import (
    ClientProc,
    HeraldTarget,
    StockTarget,
    Target,
    drop_db,
    free_port,
    pct,
    setup_db,
)

ROOT = Path(__file__).resolve().parent.parent
NCHAN_MODULE_PATHS = [
    Path("/usr/lib/nginx/modules/ngx_nchan_module.so"),
    Path("/usr/share/nginx/modules/ngx_nchan_module.so"),
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
MULTI_CHANNELS = 20


# -- a process tree's resources -------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx's worker, `herald serve --processes`' children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def tree_rss_kb(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_s(pid: int) -> float:
    return sum(cpu_s(p) for p in tree(pid))


# -- Nchan ----------------------------------------------------------------------------------


NCHAN_CONF = """\
worker_processes 1;
daemon off;
master_process on;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
load_module {module};
worker_rlimit_nofile 20000;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    server {{
        listen 127.0.0.1:{port} reuseport;
        location = /health {{ return 200 "ok"; }}
        location ~ /sub/(\\w+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
            nchan_eventsource_ping_interval {heartbeat};
        }}
        location ~ /msub/([\\w,]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_channel_id_split_delimiter ",";
            nchan_subscriber_first_message newest;
            nchan_eventsource_ping_interval {heartbeat};
        }}
        location ~ /pub/(\\w+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length 16;
            nchan_message_timeout 60s;
        }}
    }}
}}
"""


def nchan_module() -> Path | None:
    return next((p for p in NCHAN_MODULE_PATHS if p.exists()), None)


def ensure_nchan(may_install: bool) -> str | None:
    """None when nginx with the nchan module is here (installed now if need be and
    allowed), else why Nchan is skipped."""
    if shutil.which("nginx") and nchan_module():
        return None
    if not may_install:
        return "nginx or its nchan module is missing (--no-install)"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "nginx-light/libnginx-mod-nchan missing and apt-get unavailable (not root?)"
    print("== installing nginx-light and libnginx-mod-nchan with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "-qq", "nginx-light", "libnginx-mod-nchan"],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get install failed: {tail[0]}"
    if shutil.which("nginx") and nchan_module():
        return None
    return "installed, but nginx or the nchan module is still not found"


class NchanTarget(Target):
    name = "nchan"
    probe = "/health"
    ready = "HTTP/1.1 200"  # Nchan subscribes before it sends its response head

    def __init__(self, port: int, heartbeat_s: float) -> None:
        super().__init__(port)
        self.heartbeat_s = heartbeat_s
        self.prefix = ""

    def start(self) -> None:
        self.prefix = tempfile.mkdtemp(prefix="herald-bench-nchan-")
        module = nchan_module()
        conf = Path(self.prefix) / "nginx.conf"
        conf.write_text(
            NCHAN_CONF.format(
                prefix=self.prefix,
                module=module,
                port=self.port,
                heartbeat=max(1, round(self.heartbeat_s)),
                # As root, the worker would run as nobody and could not use the prefix.
                user="user root;" if os.geteuid() == 0 else "",
            )
        )
        self.proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", self.prefix])

    def stop(self) -> None:
        super().stop()
        if self.prefix:
            shutil.rmtree(self.prefix, ignore_errors=True)

    def request(self) -> str:
        return "GET /sub/bench HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"

    def multi_request(self, channels: list[str]) -> str:
        return (
            f"GET /msub/{','.join(channels)} HTTP/1.1\r\nHost: x\r\n"
            "Accept: text/event-stream\r\n\r\n"
        )

    async def post(self, session: Any, seq: int, channel: str = "bench") -> None:
        url = f"http://127.0.0.1:{self.port}/pub/{channel}"
        async with session.post(url, data=f"mk:{seq}:") as resp:
            assert resp.status in (200, 201, 202), resp.status


class HeraldServeTarget(HeraldTarget):
    """``herald serve`` itself (with HERALD_PROCESSES), not the in-bench runner."""

    def __init__(self, port: int, env: dict[str, str], processes: int) -> None:
        super().__init__(port, env)
        self.name = f"herald-p{processes}"
        self.processes = processes

    def start(self) -> None:
        env = {**os.environ, **self.env, "HERALD_PORT": str(self.port)}
        env["HERALD_PROCESSES"] = str(self.processes)
        self.proc = subprocess.Popen([sys.executable, "-m", "herald", "serve"], env=env, cwd=ROOT)


def py_spy_start(target: Target, out: str | None) -> subprocess.Popen[bytes] | None:
    """py-spy (pip install py-spy) sampling the server while publishers run flat out."""
    if not out:
        return None
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    spy = subprocess.Popen(
        [exe, "record", "-p", str(target.pid), "-f", "raw", "-o", out, "-r", "200"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # attached before the first post
    return spy


def py_spy_stop(spy: subprocess.Popen[bytes] | None, out: str | None) -> None:
    """Stop sampling; print the frames with the most samples on top of the stack."""
    if spy is None or not out:
        return
    spy.send_signal(signal.SIGINT)
    spy.wait(30)
    own: dict[str, int] = {}
    total = 0
    for line in Path(out).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] = own.get(leaf, 0) + int(count)
        total += int(count)
    print(f"   py-spy, {total} samples (stacks in {out}); top frames by own samples:")
    for leaf, count in sorted(own.items(), key=lambda kv: -kv[1])[:15]:
        print(f"   {count / total * 100:5.1f}%  {leaf}")


def ready_marker(target: Target) -> str:
    return getattr(target, "ready", "event: ready")


# -- measuring one peer ---------------------------------------------------------------------


class Pair:
    """The two client processes, used as one: streams split between them, waits merged."""

    def __init__(self) -> None:
        self.procs = [ClientProc(), ClientProc()]

    @property
    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.procs]

    async def open(self, n: int, port: int, request: str, ready: str) -> None:
        halves = [n // 2, n - n // 2]
        outs = await asyncio.gather(
            *(
                c.call(cmd="open", n=k, host="127.0.0.1", port=port, request=request, ready=ready)
                for c, k in zip(self.procs, halves, strict=True)
                if k
            )
        )
        failed = sum(o["failed"] for o in outs)
        assert failed == 0, f"{failed} of {n} streams failed to open"

    async def wait(self, seqs: list[int], n: int, timeout: float = 60) -> dict[int, dict[str, Any]]:
        halves = [n // 2, n - n // 2]
        outs = await asyncio.gather(
            *(
                c.call(cmd="wait", seqs=seqs, count=k, timeout=timeout)
                for c, k in zip(self.procs, halves, strict=True)
            )
        )
        merged: dict[int, dict[str, Any]] = {}
        for s in seqs:
            parts = [o[str(s)] for o in outs if o[str(s)]["n"]]
            merged[s] = {
                "n": sum(p["n"] for p in parts),
                "first": min((p["first"] for p in parts), default=0.0),
                "last": max((p["last"] for p in parts), default=0.0),
            }
        return merged

    async def close(self) -> None:
        await asyncio.gather(*(c.call(cmd="close") for c in self.procs))

    def stop(self) -> None:
        for c in self.procs:
            c.stop()


async def herald_channels(session: Any, target: HeraldTarget, k: int) -> list[int]:
    ids = []
    for i in range(k):
        async with session.post(
            f"http://127.0.0.1:{target.port}/api/v1/channels",
            json={"name": f"peers-{target.port}-{time.monotonic_ns()}-{i}"},
            headers={"Authorization": f"Bearer {target.token}"},
        ) as resp:
            body = await resp.json()
            assert resp.status == 201, body
            ids.append(body["id"])
    return ids


async def fanout(target: Target, pair: Pair, session: Any, n: int, rounds: int) -> dict[str, float]:
    """Post one marked message at a time; post → first and → last of ``n`` streams."""
    last, first, answered = [], [], []
    for _ in range(rounds):
        seq = target.seq
        target.seq += 1
        t0 = time.monotonic()
        await target.post(session, seq)
        answered.append((time.monotonic() - t0) * 1000)
        got = (await pair.wait([seq], n, timeout=30))[seq]
        assert got["n"] >= n, (target.name, got, n)
        last.append((got["last"] - t0) * 1000)
        first.append((got["first"] - t0) * 1000)
        await asyncio.sleep(0.05)
    return {
        "last_p50": pct(last, 0.5),
        "last_p99": pct(last, 0.99),
        "first_p50": pct(first, 0.5),
        "post_p50": pct(answered, 0.5),
    }


async def flat_out(
    target: Target,
    pair: Pair,
    session: Any,
    n: int,
    messages: int,
    publishers: int,
    profile: str | None = None,
) -> dict[str, float]:
    """``publishers`` posting back to back, ``messages`` in all, to ``n`` streams: deliveries
    per second (first post → last delivery), server and client CPU over that time."""
    seqs = list(range(target.seq, target.seq + messages))
    target.seq += messages
    todo = list(reversed(seqs))

    async def publisher() -> None:
        while todo:
            await target.post(session, todo.pop())

    spy = py_spy_start(target, profile)
    cpu0, ccpu0 = tree_cpu_s(target.pid), [cpu_s(p) for p in pair.pids]
    t0 = time.monotonic()
    await asyncio.gather(*(publisher() for _ in range(publishers)))
    got = await pair.wait(seqs, n, timeout=120)
    end = max(g["last"] for g in got.values())
    cpu1, ccpu1 = tree_cpu_s(target.pid), [cpu_s(p) for p in pair.pids]
    py_spy_stop(spy, profile)
    delivered = sum(g["n"] for g in got.values())
    assert delivered >= n * messages, (target.name, delivered, n * messages)
    elapsed = end - t0
    return {
        "deliveries_per_s": delivered / elapsed,
        "cpu_us_per_delivery": (cpu1 - cpu0) / delivered * 1e6,
        # Counted until the wait returned, a little after the last delivery.
        "client_cpu_pct": max(b - a for a, b in zip(ccpu0, ccpu1, strict=True)) / elapsed * 100,
    }


async def measure_peer(target: Target, pair: Pair, args: argparse.Namespace) -> dict[str, Any]:
    """Per-channel streams: KB each, fan-out, flat out, idle CPU at the largest size."""
    import aiohttp

    res: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        await target.wait_up(session)
        if isinstance(target, HeraldTarget):
            (target.channel_id,) = await herald_channels(session, target, 1)
        ready = ready_marker(target)
        # Warm code paths up (posts as concurrent as the flat-out run's, so every pooled
        # connection a peer opens for them exists before it is timed), then the baseline.
        await pair.open(50, target.port, target.request(), ready)
        for _ in range(3):
            await asyncio.gather(
                *(target.post(session, target.seq + i) for i in range(args.publishers))
            )
            target.seq += args.publishers
        await asyncio.sleep(0.3)
        await pair.close()
        await asyncio.sleep(1.0)
        rss0 = tree_rss_kb(target.pid)
        opened = 0
        for n in args.sizes:
            await pair.open(n - opened, target.port, target.request(), ready)
            opened = n
            await asyncio.sleep(args.settle)
            res[f"kb{n}"] = (tree_rss_kb(target.pid) - rss0) / n
            if n == 1000:
                f = await fanout(target, pair, session, n, args.rounds)
                res.update({f"f1000_{k}": v for k, v in f.items()})
                spy = args.py_spy if isinstance(target, HeraldTarget) else None
                res.update(
                    await flat_out(target, pair, session, n, args.messages, args.publishers, spy)
                )
            elif n == max(args.sizes):
                f = await fanout(target, pair, session, n, max(5, args.rounds // 3))
                res.update({f"f{n}_{k}": v for k, v in f.items()})
        await asyncio.sleep(1.0)
        cpu0 = tree_cpu_s(target.pid)
        await asyncio.sleep(args.idle_window)
        res["idle_cpu_pct"] = (tree_cpu_s(target.pid) - cpu0) / args.idle_window * 100
        res["idle_streams"] = opened
        await pair.close()
    return res


async def measure_multi(target: Target, pair: Pair, args: argparse.Namespace) -> dict[str, Any]:
    """1,000 streams of 20 channels each (a fresh server): KB per stream."""
    import aiohttp

    n = 1000
    async with aiohttp.ClientSession() as session:
        await target.wait_up(session)
        if isinstance(target, HeraldTarget):
            ids = await herald_channels(session, target, MULTI_CHANNELS)
            (target.channel_id,) = ids[:1]
            request = (
                f"GET /api/v1/events?channels={','.join(map(str, ids))} HTTP/1.1\r\n"
                f"Host: x\r\nAuthorization: Bearer {target.token}\r\n\r\n"
            )
        else:
            assert isinstance(target, NchanTarget)
            request = target.multi_request([f"m{i}" for i in range(MULTI_CHANNELS)])
        ready = ready_marker(target)
        await pair.open(50, target.port, request, ready)
        await pair.close()
        await asyncio.sleep(1.0)
        rss0 = tree_rss_kb(target.pid)
        await pair.open(n, target.port, request, ready)
        await asyncio.sleep(args.settle)
        kb = (tree_rss_kb(target.pid) - rss0) / n
        await pair.close()
    return {"kb_multi1000": kb}


async def run_target(make: Any, pair: Pair, args: argparse.Namespace, multi: bool) -> dict:
    res: dict[str, Any] = {}
    target = make()
    target.port = free_port()
    target.start()
    try:
        res.update(await measure_peer(target, pair, args))
    finally:
        target.stop()
    if multi:
        target = make()
        target.port = free_port()
        target.start()
        try:
            res.update(await measure_multi(target, pair, args))
        finally:
            target.stop()
    return res


# -- the table ------------------------------------------------------------------------------

# (label, key, format, target ratio to Nchan or None, lower is better)
ROWS: list[tuple[str, str, str, str]] = [
    ("KB per idle stream at {n}", "kb{n}", "{:.1f}", "<= 0.8x"),
    ("KB per idle stream, 20 channels each (1000)", "kb_multi1000", "{:.1f}", "<= 0.8x"),
    ("idle CPU % with {max} streams (heartbeat {hb:g} s)", "idle_cpu_pct", "{:.2f}", "<= 1.0x"),
    ("fan-out to 1000: post -> last, p50 ms", "f1000_last_p50", "{:.1f}", "<= 1.0x"),
    ("fan-out to 1000: post -> last, p99 ms", "f1000_last_p99", "{:.1f}", "<= 1.0x"),
    ("fan-out to {max}: post -> last, p50 ms", "f{max}_last_p50", "{:.1f}", "<= 1.0x"),
    ("fan-out to {max}: post -> last, p99 ms", "f{max}_last_p99", "{:.1f}", "<= 1.0x"),
    ("post -> first subscriber, p50 ms", "f1000_first_p50", "{:.2f}", "<= 5 ms"),
    ("  the post's own answer, p50 ms", "f1000_post_p50", "{:.2f}", ""),
    ("server CPU per delivery, us (1000 subs)", "cpu_us_per_delivery", "{:.1f}", "<= 1.2x"),
    ("deliveries/s (1000 subs, flat out)", "deliveries_per_s", "{:,.0f}", ">= 0.9x"),
    ("  busiest client process CPU % meanwhile", "client_cpu_pct", "{:.0f}", ""),
]


def median_rows(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, results in runs.items():
        keys = {k for r in results for k in r}
        out[name] = {
            k: statistics.median([r[k] for r in results if k in r])
            for k in keys
            if isinstance(results[0].get(k, 0), int | float)
        }
    return out


def report(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    names = list(rows)
    largest = max(args.sizes)
    expanded: list[tuple[str, str, str, str]] = []
    for label, key, fmt, goal in ROWS:
        if "{n}" in key:
            for n in args.sizes:
                expanded.append((label.format(n=n), key.format(n=n), fmt, goal))
        elif "{max}" in key:
            if largest == 1000:
                continue
            expanded.append((label.format(max=largest), key.format(max=largest), fmt, goal))
        else:
            expanded.append((label.format(max=largest, hb=args.heartbeat), key, fmt, goal))
    width = max(len(r[0]) for r in expanded) + 2
    head = f"{'':<{width}}" + "".join(f"{n:>14}" for n in names)
    head += f"{'herald/nchan':>14}  target"
    print(f"\nPeers: medians of {args.runs} run(s), streams split over two client processes")
    print(head)
    for label, key, fmt, goal in expanded:
        cells = []
        for n in names:
            v = rows[n].get(key)
            cells.append(f"{fmt.format(v) if v is not None else '-':>14}")
        h, nc = rows.get("herald", {}).get(key), rows.get("nchan", {}).get(key)
        ratio = f"{h / nc:.2f}x" if h is not None and nc else "-"
        print(f"{label:<{width}}" + "".join(cells) + f"{ratio:>14}  {goal}")
    for name in names:
        if name.startswith("herald-p") and "deliveries_per_s" in rows.get("herald", {}):
            x = rows[name]["deliveries_per_s"] / rows["herald"]["deliveries_per_s"]
            print(f"{name} deliveries/s / herald (one process): {x:.2f}x (target >= 1.6x)")


def herald_env(database_url: str, heartbeat_s: float) -> dict[str, str]:
    """Herald's settings in every peer bench: room for 20,000 streams from one address's
    clients, quiet logs, a short drain."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": os.environ.get("HERALD_BENCH_REDIS", "redis://127.0.0.1:6379/11"),
        "HERALD_HOST": "127.0.0.1",
        "HERALD_SSE_MAX_PER_IP": "200",
        "HERALD_SSE_MAX_CONNECTIONS": "20000",
        "HERALD_SHUTDOWN_TIMEOUT_S": "2",
        "HERALD_SSE_HEARTBEAT_S": str(heartbeat_s),
        "HERALD_LOG_LEVEL": "error",
    }


async def driver(args: argparse.Namespace) -> None:
    skip = ensure_nchan(not args.no_install) if "nchan" in args.peers else None
    peers = [p for p in args.peers if not (p == "nchan" and skip)]
    if skip:
        print(f"== nchan: skipped: {skip}", flush=True)
    db_name = f"herald_peers_{os.getpid()}"
    url, token = await setup_db(db_name)
    env = herald_env(url, args.heartbeat)

    def herald() -> HeraldTarget:
        t = HeraldTarget(0, env)
        t.token = token
        return t

    def herald_procs() -> HeraldTarget:
        t = HeraldServeTarget(0, env, args.processes)
        t.token = token
        return t

    makers: dict[str, Any] = {
        "nchan": lambda: NchanTarget(0, args.heartbeat),
        "stock": lambda: StockTargetHB(0, args.heartbeat),
        "herald": herald,
    }
    if args.processes > 1:
        makers[f"herald-p{args.processes}"] = herald_procs
        peers.append(f"herald-p{args.processes}")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in peers}
    pair = Pair()
    try:
        for run in range(args.runs):
            for name in peers:
                print(f"== run {run + 1}/{args.runs}: {name} ...", flush=True)
                started = time.monotonic()
                multi = name in ("nchan", "herald")
                runs[name].append(await run_target(makers[name], pair, args, multi))
                print(f"   done in {time.monotonic() - started:.0f}s", flush=True)
    finally:
        pair.stop()
        drop_db(db_name)
    report(median_rows(runs), args)
    load = os.getloadavg()
    print(
        f"\n(machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f}"
        f" {load[2]:.1f} at the end; Herald's posts are REST posts committed to PostgreSQL,"
        " Nchan's and stock's are in-memory publishes)"
    )


class StockTargetHB(StockTarget):
    """The stock server with the same heartbeat as the others."""

    def __init__(self, port: int, heartbeat_s: float) -> None:
        super().__init__(port)
        self.heartbeat_s = heartbeat_s

    def start(self) -> None:
        script = str(Path(__file__).with_name("stock_sse.py"))
        self.proc = subprocess.Popen(
            [sys.executable, script, str(self.port), str(self.heartbeat_s)]
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one run, short windows")
    parser.add_argument("--runs", type=int, default=None, help="runs per peer (default 2)")
    parser.add_argument(
        "--sizes", default="1000", help="stream counts for KB per stream, e.g. 1000,5000,10000"
    )
    parser.add_argument("--heartbeat", type=float, default=15.0, help="seconds, every peer")
    parser.add_argument("--idle-window", type=float, default=None, help="seconds of idle CPU")
    parser.add_argument("--processes", type=int, default=1, help="also herald serve with N")
    parser.add_argument("--peers", default="nchan,stock,herald")
    parser.add_argument("--no-install", action="store_true", help="never apt-get nginx")
    parser.add_argument("--py-spy", metavar="FILE", help="profile Herald's flat-out run")
    args = parser.parse_args()
    args.sizes = sorted({int(s) for s in args.sizes.split(",")} | {1000})
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    if args.runs is None:
        args.runs = 1 if args.quick else 2
    if args.idle_window is None:
        args.idle_window = 10.0 if args.quick else 2 * args.heartbeat
    args.rounds = 15 if args.quick else 40
    args.messages = 100 if args.quick else 300
    args.publishers = 8
    args.settle = 1.5 if args.quick else 2.5
    asyncio.run(driver(args))


if __name__ == "__main__":
    main()
