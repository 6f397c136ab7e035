"""redis.asyncio commands as kv resources, against the real Redis on 127.0.0.1:6379."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError, ResponseError

from asgi_asynctrace import Trace, instrument, uninstrument
from tests.helpers import _request, run, traced

pytestmark = pytest.mark.service("redis")
URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def _redis_on() -> None:
    assert instrument("redis") == {"redis": True}


def kv(trace: Trace) -> list[tuple[str, dict[str, Any]]]:
    return [(r.type, trace.annotations_of(r.async_id)) for r in trace.resources
            if r.type.startswith("kv-")]  # fmt: skip


def test_commands_map_to_kv_types_with_key_hit_and_ttl_and_never_the_value() -> None:
    key = f"asynctrace-test:{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with Redis.from_url(URL) as r:
            assert await r.get(key) is None
            await r.set(key, "secret-value", ex=30)
            assert await r.get(key) == b"secret-value"
            assert await r.mget([key, key + ":none"]) == [b"secret-value", None]
            assert await r.exists(key) == 1
            await r.hset(key + ":h", "field", "v")
            async for _ in r.scan_iter(match=key + "*"):
                pass
            await r.delete(key, key + ":h")
            await r.ping()

    trace = traced(body)
    got = kv(trace)
    slim = [(t, {k: v for k, v in n.items() if k in ("command", "key", "keys", "hit", "hits",
                                                        "ttl")}) for t, n in got]  # fmt: skip
    assert slim[:6] == [
        ("kv-get", {"command": "GET", "key": key, "hit": False}),
        ("kv-put", {"command": "SET", "key": key, "ttl": 30.0}),
        ("kv-get", {"command": "GET", "key": key, "hit": True}),
        ("kv-get", {"command": "MGET", "keys": 2, "hits": 1}),
        ("kv-get", {"command": "EXISTS", "keys": 1, "hit": True}),
        ("kv-put", {"command": "HSET", "key": key + ":h"}),
    ]
    assert ("kv-list", "SCAN") in {(t, n["command"]) for t, n in got}
    assert ("kv-delete", {"command": "DEL", "keys": 2}) in slim
    assert slim[-1] == ("kv-command", {"command": "PING"})
    assert "secret-value" not in trace.to_json().decode()
    assert all(r.state == "ok" for r in trace.resources if r.type.startswith("kv-"))


def test_a_pipeline_and_a_transaction_are_one_resource_each_listing_their_commands() -> None:
    key = f"asynctrace-test:{uuid.uuid4().hex[:8]}"

    async def body() -> None:
        async with Redis.from_url(URL) as r:
            async with r.pipeline(transaction=False) as pipe:
                chain: Any = pipe  # redis-py types pipeline commands as the client's
                await chain.set(key, 1).incr(key).get(key).execute()
            async with r.pipeline(transaction=True) as tx:
                chain = tx
                await chain.delete(key).execute()

    got = kv(traced(body))
    assert [(t, n["commands"], n["count"], n["transaction"]) for t, n in got] == [
        ("kv-pipeline", "SET,INCRBY,GET", 3, False),  # redis-py sends INCR as INCRBY
        ("kv-pipeline", "DEL", 1, True),
    ]


def test_errors_reach_the_app_unchanged_and_are_recorded() -> None:
    key = f"asynctrace-test:{uuid.uuid4().hex[:8]}"
    raised: list[str] = []

    async def body() -> None:
        async with Redis.from_url(URL) as r:
            await r.rpush(key, "x")
            try:
                await r.get(key)  # WRONGTYPE: a list is not a string
            except ResponseError:
                raised.append("ResponseError")
            await r.delete(key)
        async with Redis.from_url("redis://127.0.0.1:1/0") as down:
            try:
                await down.get(key)
            except ConnectionError:
                raised.append("ConnectionError")

    trace = traced(body)
    assert raised == ["ResponseError", "ConnectionError"]
    failed = [(n["command"], n["error"]) for t, n in kv(trace) if "error" in n]
    assert failed == [("GET", "ResponseError"), ("GET", "ConnectionError")]


def test_untraced_calls_and_uninstrument_leave_redis_alone() -> None:
    import redis.asyncio.client

    async def ping() -> bool:
        async with Redis.from_url(URL) as r:
            return bool(await r.ping())

    assert run(ping())  # outside a request: just a command
    wrapped = redis.asyncio.client.Redis.execute_command
    uninstrument("redis")
    assert redis.asyncio.client.Redis.execute_command is wrapped.__wrapped__  # type: ignore[attr-defined]

    async def body() -> None:
        await ping()

    trace = run(_request(body, instrument=False))
    assert trace is not None and kv(trace) == []
