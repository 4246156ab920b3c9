"""``herald tokens create|list|revoke`` as real subprocesses (and in-process for the
hostile inputs): output, exit codes, one-line errors, and what the server then says."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from server.keys import USERS
from shared.services.users import hash_token
from shared.settings import Settings
from tests.cli_helpers import subprocess_env, use_in_process
from tests.helpers import API

HERALD = str(Path(sys.executable).parent / "herald")


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def one_line_error(self, code: int, *needles: str) -> str:
        assert self.code == code, (self.code, self.out, self.err)
        lines = self.err.strip().splitlines()
        assert "Traceback" not in self.err + self.out
        # argparse's usage line, then its error; or herald's own one line.
        assert len(lines) == (2 if code == 2 else 1), self.err
        assert len(lines[-1]) < 200, lines[-1]
        for needle in needles:
            assert needle in lines[-1], (needle, lines[-1])
        return lines[-1]


@pytest.fixture
def env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    return subprocess_env(settings, tmp_path)


async def herald(env: dict[str, str], cwd: Path, *args: str, **extra: str) -> Result:
    proc = await asyncio.create_subprocess_exec(
        HERALD,
        *args,
        env={**env, **extra},
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def me(client: TestClient[Any, Any], token: str) -> int:
    resp = await client.get(f"{API}/me", headers={"Authorization": f"Bearer {token}"})
    await resp.read()
    return resp.status


def fields(out: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in out.splitlines())


async def test_create_list_revoke_round_trip(
    env: dict[str, str], tmp_path: Path, client: TestClient[Any, Any]
) -> None:
    created = await herald(env, tmp_path, "users", "create", "carol")
    assert created.code == 0, created.err
    first = fields(created.out)["token"]  # users create still prints a first token
    made = await herald(env, tmp_path, "tokens", "create", "carol", "--expires-in", "7")
    assert made.code == 0, made.err
    got = fields(made.out)
    assert list(got) == ["id", "token"] and got["id"].isdigit()
    second = got["token"]
    plain = await herald(env, tmp_path, "tokens", "create", "carol", "--label", "ci bot")
    assert list(fields(plain.out)) == ["id", "token"]
    for token in (first, second, fields(plain.out)["token"]):
        assert await me(client, token) == 200

    listed = await herald(env, tmp_path, "tokens", "list", "carol")
    assert listed.code == 0, listed.err
    lines = listed.out.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATUS",
        "CREATED",
        "LAST",
        "USED",
        "EXPIRES",
        "REVOKED",
        "LABEL",
    ]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), key=int) and len(rows) == 3
    assert [r[1] for r in rows] == ["active"] * 3
    assert rows[0][3] != "never"  # used above: last use recorded
    assert rows[1][4].endswith("Z") and rows[0][4] == "never"
    assert lines[3].endswith("ci bot")
    for token in (first, second):
        assert token not in listed.out and token[4:] not in listed.out
        assert hash_token(token).hex() not in listed.out

    token_id = got["id"]
    revoked = await herald(env, tmp_path, "tokens", "revoke", token_id)
    assert (revoked.code, revoked.out, revoked.err) == (0, f"revoked: token {token_id}\n", "")
    assert await me(client, second) == 401
    assert await me(client, first) == 200  # the user's other tokens keep working
    again = await herald(env, tmp_path, "tokens", "revoke", token_id)
    assert again.code == 0 and again.out.startswith(f"already revoked: token {token_id} (at ")
    listed = await herald(env, tmp_path, "tokens", "list", "carol")
    row = listed.out.splitlines()[2].split()
    assert row[0] == token_id and row[1] == "revoked" and row[5].endswith("Z")


async def test_unknown_user_and_token_exit_1_in_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    results = await asyncio.gather(
        herald(env, tmp_path, "tokens", "create", "nobody"),
        herald(env, tmp_path, "tokens", "list", "nobody"),
        herald(env, tmp_path, "tokens", "revoke", "987654"),
    )
    results[0].one_line_error(1, "user 'nobody' not found")
    results[1].one_line_error(1, "user 'nobody' not found")
    results[2].one_line_error(1, "token 987654 not found")
    assert all(r.out == "" for r in results)


async def test_bad_days_and_ids_exit_2(env: dict[str, str], tmp_path: Path) -> None:
    bad_days = ["0", "-1", "abc", "1e3", "1.5", "", "3651", "9" * 40, "٣", "nan"]
    bad_ids = ["0", "-1", "abc", "1.5", "", "9" * 30, str(2**63), "٣", "1 2"]
    results = await asyncio.gather(
        *(herald(env, tmp_path, "tokens", "create", "x", "--expires-in", d) for d in bad_days),
        *(herald(env, tmp_path, "tokens", "revoke", i) for i in bad_ids),
    )
    for arg, result in zip(bad_days + bad_ids, results, strict=True):
        line = result.one_line_error(2)
        assert "--expires-in" in line or "TOKEN_ID" in line, (arg, line)
        assert "9" * 40 not in line  # a huge argument is cut, not echoed


async def test_concurrent_revokes_revoke_once(
    env: dict[str, str], tmp_path: Path, client: TestClient[Any, Any]
) -> None:
    user, _ = await client.app[USERS].create("dana")
    info, token = await client.app[USERS].create_token(user)
    results = await asyncio.gather(
        *(herald(env, tmp_path, "tokens", "revoke", str(info.id)) for _ in range(6))
    )
    assert [r.code for r in results] == [0] * 6, [r.err for r in results]
    outs = sorted(r.out.split(":")[0] for r in results)
    assert outs == ["already revoked"] * 5 + ["revoked"], outs
    assert await me(client, token) == 401


async def test_revoke_with_redis_unreachable_still_revokes(
    env: dict[str, str], tmp_path: Path, client: TestClient[Any, Any]
) -> None:
    user, _ = await client.app[USERS].create("eve")
    info, token = await client.app[USERS].create_token(user)
    result = await herald(
        env, tmp_path, "tokens", "revoke", str(info.id), REDIS_URL="redis://127.0.0.1:1/0"
    )
    assert result.code == 0 and result.err == "", result.err
    assert result.out.splitlines() == [
        f"revoked: token {info.id}",
        "note: Redis unreachable; servers refuse the token within 2 s all the same",
    ]
    assert await me(client, token) == 401


# In-process (the CLI runs its own event loop, so these are plain functions).


@pytest.fixture
def cli_env(env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_in_process(env, tmp_path, monkeypatch)


HOSTILE_NAMES = [
    "o'brien\"); DROP TABLE api_tokens;--",
    "Zoë 🚀",
    "%s %(x)s {0}",
    "x" * 10_000,
    "a\\b",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_in_process(
    cli_env: None, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    from herald.cli import main

    # Unknown: exit 1, one short line.
    for command in (["tokens", "create", name], ["tokens", "list", name]):
        assert main(command) == 1
        captured = capsys.readouterr()
        assert captured.out == "" and len(captured.err.splitlines()) == 1
        assert "not found" in captured.err and len(captured.err) < 200
    if len(name) > 80:
        return  # not a valid user name, so it can only ever be unknown
    assert main(["users", "create", name]) == 0
    capsys.readouterr()
    assert main(["tokens", "create", name, "--label", name[:80]]) == 0
    made = fields(capsys.readouterr().out)
    assert main(["tokens", "list", name]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 3 and made["token"] not in out
    assert main(["tokens", "revoke", made["id"]]) == 0
    assert capsys.readouterr().out == f"revoked: token {made['id']}\n"


def test_bad_labels_and_surrogates_in_process(
    cli_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    from herald.cli import main

    assert main(["users", "create", "fred"]) == 0
    capsys.readouterr()
    for label in ("", "x" * 81, "tab\there", "bad\udcff"):
        assert main(["tokens", "create", "fred", "--label", label]) == 1
        err = capsys.readouterr().err
        assert err.startswith("herald: label") and len(err.splitlines()) == 1
    # A name that is not valid UTF-8 on the command line (surrogate-escaped bytes).
    assert main(["tokens", "list", "bad\udcff"]) == 1
    assert len(capsys.readouterr().err.splitlines()) == 1
