"""A Redis Sentinel set-up of real processes for the failover tests: a master, a
replica (``--replicaof``) and three Sentinels (quorum 2) on free ports, each with its
own writable config file; the master can be killed and the Sentinels asked who the
master is now. Waits poll with deadlines (tests/helpers.wait_for), never sleep.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from tests.faults.delivery_procs import free_port
from tests.helpers import wait_for

MASTER_NAME = "herald"
# Sentinel's own timings, as short as it allows: the master counts as down after 1 s
# without an answer; a failover that stalls is retried after 3 s.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args], capture_output=True, timeout=5, check=False
    )
    return done.stdout.decode().strip()


class SentinelSet:
    """Master, replica and three Sentinels; ``close()`` ends every one still running."""

    def __init__(self, workdir: Path, master_name: str = MASTER_NAME) -> None:
        self.workdir = workdir
        self.master_name = master_name
        self.redis_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port(), free_port(), free_port()]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def sentinels_env(self) -> str:
        """The ``REDIS_SENTINELS`` value for these Sentinels."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def _spawn(self, port: int, args: list[str]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / f"{port}.log", "wb")  # noqa: SIM115
        self.procs[port] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _redis(self, port: int, *extra: str) -> None:
        self._spawn(
            port,
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *extra],
        )  # fmt: skip

    def _sentinel(self, port: int, master_port: int) -> None:
        conf = self.workdir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.workdir}\n"
            f"sentinel monitor {self.master_name} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {self.master_name} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {self.master_name} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {self.master_name} 1\n",
            encoding="utf-8",
        )
        self._spawn(port, ["redis-server", str(conf), "--sentinel"])

    async def start(self) -> None:
        master, replica = self.redis_ports
        self._redis(master)
        self._redis(replica, "--replicaof", "127.0.0.1", str(master))
        await wait_for(lambda: cli(master, "ping") == "PONG", 10, "the master", interval=0.05)
        await wait_for(
            lambda: "master_link_status:up" in cli(replica, "info", "replication"),
            10,
            "the replica to sync",
            interval=0.05,
        )
        for port in self.sentinel_ports:
            self._sentinel(port, master)

        def all_see_each_other() -> bool:
            # Each Sentinel knows the replica and the two others: a failover can start.
            for port in self.sentinel_ports:
                info = cli(port, "sentinel", "master", self.master_name).split("\n")
                fields = dict(zip(info[::2], info[1::2], strict=False))
                if fields.get("num-slaves") != "1" or fields.get("num-other-sentinels") != "2":
                    return False
            return True

        await wait_for(all_see_each_other, 20, "the Sentinels to find each other", interval=0.1)

    def master_port(self, sentinel_port: int | None = None) -> int | None:
        """The master's port as a Sentinel names it (None: it does not answer)."""
        out = cli(sentinel_port or self.sentinel_ports[0], "sentinel",
                  "get-master-addr-by-name", self.master_name).split()  # fmt: skip
        return int(out[1]) if len(out) == 2 and out[1].isdigit() else None

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    async def wait_failover(self, old: int, timeout: float = 20) -> int:
        """Wait until every Sentinel names a master other than ``old``, and it takes
        writes; its port."""

        def moved() -> bool:
            ports = {self.master_port(p) for p in self.sentinel_ports}
            if len(ports) != 1 or None in ports or old in ports:
                return False
            (port,) = ports
            assert port is not None
            return "role:master" in cli(port, "info", "replication")

        await wait_for(moved, timeout, "the Sentinels' failover", interval=0.1)
        port = self.master_port()
        assert port is not None
        return port

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)


@contextlib.asynccontextmanager
async def sentinel_set(workdir: Path) -> AsyncIterator[SentinelSet]:
    sentinels = SentinelSet(workdir)
    try:
        await sentinels.start()
        yield sentinels
    finally:
        await sentinels.close()
