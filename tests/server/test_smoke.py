async def test_health_ok_shape(client):
    resp = await client.get("/health")
    body = await resp.json()
    assert body["checks"]["database"]["ok"] is True
    assert body["checks"]["redis"]["ok"] is True


async def test_create_and_list_channel(client, alice):
    resp = await client.post("/api/v1/channels", json={"name": "general"}, headers=alice.headers)
    assert resp.status == 201
    resp = await client.get("/api/v1/channels", headers=alice.headers)
    body = await resp.json()
    assert [c["name"] for c in body["items"]] == ["general"]
