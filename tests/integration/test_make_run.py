"""``make run`` under a real terminal: Ctrl-C stops everything and make exits 0.

GNU make kills itself with SIGINT after a Ctrl-C whatever its child returns, so this is
only true because herald/devrun.py takes the terminal's foreground for itself. The test
drives make through a pseudo-terminal and types Ctrl-C (0x03), as a person would.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import subprocess
import termios
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    import socket

    for port in range(27000 + (os.getpid() % 40) * 20, 28000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 27000-27999")


def read_until(fd: int, proc: subprocess.Popen[bytes], text: bytes, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while text not in out and time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:
                break
    return out


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_ctrl_c_in_make_run_exits_0(settings):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HERALD_", "DATABASE_URL", "REDIS_URL", "CRON_SECRET", "MAKE"))
    }
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        HERALD_PORT=str(free_port()),
        HERALD_WORKER_METRICS_PORT="0",
        HERALD_UPLOAD_DIR=str(settings.upload_dir),
    )
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # a session whose terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    try:
        out = read_until(master, proc, b"press Ctrl-C", 90)
        assert b"press Ctrl-C" in out, out.decode(errors="replace")[-3000:]
        os.write(master, b"\x03")
        out += read_until(master, proc, b"\x00never", 30)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = out.decode(errors="replace")
    assert "SIGINT received: stopping" in text, text[-3000:]
    assert "Interrupt" not in text  # make's "*** [run] Interrupt"
    assert code == 0, text[-3000:]
