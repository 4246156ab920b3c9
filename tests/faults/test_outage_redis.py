"""A frozen Redis (SIGSTOP on the test's own redis-server) under a real ``herald serve``
with HERALD_BACKEND_TIMEOUT_S=1: authentication and channel reads go to PostgreSQL, a
post is stored and answered 201, /health says redis is not ok, each within the timeout
+ 1 s; the Redis breaker makes the requests after the first skip Redis at once; the
publish failures are logged once per interval, not per post; after SIGCONT everything
is back without a restart.
"""

from __future__ import annotations

import aiohttp

from shared.services.users import UserService
from tests.faults.backend_procs import timed, until_status
from tests.faults.delivery_procs import cluster
from tests.helpers import API

BACKEND_S = 1.0
BOUND_S = BACKEND_S + 1.0
POSTS_WHILE_FROZEN = 10


async def test_frozen_redis_requests_answer_within_the_bound(database_url, db, tmp_path):
    async with cluster(database_url, tmp_path) as procs:
        _, token = await UserService(db=db).create("alice")
        server = await procs.serve(HERALD_BACKEND_TIMEOUT_S=str(BACKEND_S))
        base, auth = server.url, {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s:
            made = await timed(s, "POST", f"{base}{API}/channels", json={"name": "c"}, headers=auth)
            assert made.status == 201, made.body
            channel = f"{base}{API}/channels/{made.body['id']}"
            # Warm: the token and the channel are in the Redis cache now.
            assert (await timed(s, "GET", f"{base}{API}/me", headers=auth)).status == 200
            assert (await timed(s, "GET", channel, headers=auth)).status == 200

            procs.redis.freeze()
            try:
                me = await timed(s, "GET", f"{base}{API}/me", headers=auth)
                got = await timed(s, "GET", channel, headers=auth)
                post = await timed(
                    s, "POST", f"{channel}/messages", json={"body": "while frozen"}, headers=auth
                )
                health = await timed(s, "GET", f"{base}/health")
                more = [
                    await timed(s, "POST", f"{channel}/messages", json={"body": f"m{i}"},
                                headers=auth)
                    for i in range(POSTS_WHILE_FROZEN)
                ]  # fmt: skip
            finally:
                procs.redis.thaw()
            print(
                f"frozen: /me {me.seconds:.2f}s, channel {got.seconds:.2f}s,"
                f" post {post.seconds:.2f}s, /health {health.seconds:.2f}s,"
                f" next posts max {max(a.seconds for a in more):.2f}s"
            )
            assert (me.status, got.status, post.status) == (200, 200, 201), (me, got, post)
            for answer in (me, got, post, health, *more):
                assert answer.seconds < BOUND_S, answer
            assert all(a.status == 201 for a in more)
            stored = await db.fetchval(
                "SELECT body FROM messages WHERE id = %s", (post.body["id"],)
            )
            assert stored == "while frozen"
            assert health.status == 503
            assert health.body["checks"]["redis"]["ok"] is False
            assert health.body["checks"]["database"]["ok"] is True

            # Recovery, without a restart: /health ok again, the cache used again.
            back = await until_status(s, "GET", f"{base}/health", 200, 15)
            assert back.body["checks"]["redis"]["ok"] is True
            assert (await timed(s, "GET", f"{base}{API}/me", headers=auth)).status == 200
            after = await timed(s, "POST", f"{channel}/messages", json={"body": "b"}, headers=auth)
            assert after.status == 201
        log = server.text()
        # Eleven posts failed to publish; the lines about it are throttled.
        assert 1 <= log.count("publishing message event failed") <= 2, log
        assert "Traceback" not in log, log
