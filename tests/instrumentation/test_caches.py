"""aiocache and cashews calls as cache resources: memory backends and the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiocache import SimpleMemoryCache
from aiocache.backends.redis import RedisCache
from cashews import Cache

from asgi_asynctrace import Resource, Trace, instrument, uninstrument
from tests.helpers import _request, run, traced

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"
CACHE_TYPES = ("cache-get", "cache-put", "cache-delete")


REDIS = pytest.mark.service("redis")


@pytest.fixture(autouse=True)
def _caches_on() -> None:
    assert instrument("aiocache", "cashews") == {"aiocache": True, "cashews": True}


def cache_calls(trace: Trace) -> list[tuple[str, dict[str, Any]]]:
    return [
        (r.type, trace.annotations_of(r.async_id)) for r in trace.resources if r.type in CACHE_TYPES
    ]


def notes_of(trace: Trace, res: Resource) -> dict[str, Any]:
    return trace.annotations_of(res.async_id)


def only(notes: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: notes[k] for k in keys if k in notes}


def aiocache_backend(kind: str, namespace: str) -> Any:
    if kind == "memory":
        return SimpleMemoryCache(namespace=namespace)
    return RedisCache(endpoint=REDIS_HOST, port=REDIS_PORT, namespace=namespace)


@pytest.mark.parametrize("kind", ["memory", pytest.param("redis", marks=REDIS)])
def test_aiocache_calls_are_cache_resources_with_key_hit_and_ttl(kind: str) -> None:
    namespace = f"asynctrace-test-{uuid.uuid4().hex[:8]}:"
    caches: list[Any] = []

    async def work() -> None:
        cache = aiocache_backend(kind, namespace)
        caches.append(cache)
        assert await cache.get("user:1") is None
        await cache.set("user:1", "ada", ttl=30)
        assert await cache.get("user:1") == "ada"
        assert await cache.multi_get(["user:1", "user:2"]) == ["ada", None]
        assert await cache.exists("user:2") is False
        await cache.delete("user:1")
        await cache.clear()
        await cache.close()  # on the loop that opened its connections

    async def body() -> None:
        await asyncio.create_task(work())

    trace = traced(body)
    # aiocache runs each call under wait_for (tasks of its own, on Python < 3.12): the
    # cache resources belong to the task that made the calls
    (task,) = [
        r for r in trace.resources if str(notes_of(trace, r).get("coroutine")).endswith("work")
    ]
    calls = [r for r in trace.resources if r.type in CACHE_TYPES]
    assert all(r.trigger_id == task.async_id for r in calls)
    assert all(r.state == "ok" and r.settled_at is not None for r in calls)
    backend = f"aiocache:{kind}"
    assert [(t, only(n, "backend", "op", "key", "keys", "hit", "hits", "ttl"))
            for t, n in cache_calls(trace)] == [
        ("cache-get", {"backend": backend, "op": "get", "key": "user:1", "hit": False}),
        ("cache-put", {"backend": backend, "op": "set", "key": "user:1", "ttl": 30}),
        ("cache-get", {"backend": backend, "op": "get", "key": "user:1", "hit": True}),
        ("cache-get", {"backend": backend, "op": "multi_get", "keys": 2, "hits": 1}),
        ("cache-get", {"backend": backend, "op": "exists", "key": "user:2", "hit": False}),
        ("cache-delete", {"backend": backend, "op": "delete", "key": "user:1"}),
        ("cache-delete", {"backend": backend, "op": "clear"}),
    ]  # fmt: skip


@pytest.mark.parametrize("url", ["mem://", pytest.param(REDIS_URL, marks=REDIS)])
def test_cashews_commands_and_decorators_are_cache_resources(url: str) -> None:
    prefix = f"asynctrace-test-{uuid.uuid4().hex[:8]}"
    cache = Cache()
    cache.setup(url, prefix=prefix)
    calls = 0

    @cache(ttl=60, key="price:{item}", prefix=prefix)
    async def price(item: str) -> int:
        nonlocal calls
        calls += 1
        return len(item)

    async def body() -> None:
        assert await cache.get(f"{prefix}:k") is None
        await cache.set(f"{prefix}:k", 7, expire=15)
        assert await cache.get(f"{prefix}:k") == 7
        assert await price("apple") == 5  # miss, computed, stored
        assert await price("apple") == 5  # hit
        await cache.delete(f"{prefix}:k")
        await cache.close()

    trace = traced(body)
    assert calls == 1
    backend = "cashews:Memory" if url == "mem://" else "cashews:Redis"
    got = [(t, only(n, "backend", "op", "hit", "ttl")) for t, n in cache_calls(trace)]
    assert got == [
        ("cache-get", {"backend": backend, "op": "get", "hit": False}),
        ("cache-put", {"backend": backend, "op": "set", "ttl": 15}),
        ("cache-get", {"backend": backend, "op": "get", "hit": True}),
        ("cache-get", {"backend": backend, "op": "get", "hit": False}),
        ("cache-put", {"backend": backend, "op": "set", "ttl": 60}),
        ("cache-get", {"backend": backend, "op": "get", "hit": True}),
        ("cache-delete", {"backend": backend, "op": "delete"}),
    ]
    assert cache_calls(trace)[0][1]["key"] == f"{prefix}:k"


def test_a_failing_cache_call_raises_as_ever_and_is_recorded_as_an_error() -> None:
    cache = RedisCache(endpoint=REDIS_HOST, port=1, namespace="x")  # nothing listens there

    raised: list[BaseException] = []

    async def body() -> None:
        try:
            await cache.get("k")
        except Exception as exc:
            raised.append(exc)

    trace = traced(body)
    assert len(raised) == 1  # what the app sees is what it would see untraced
    ((rtype, notes),) = cache_calls(trace)
    failed: Resource = next(r for r in trace.resources if r.type == "cache-get")
    assert rtype == "cache-get" and failed.state == "error"
    assert notes["error"] == type(raised[0]).__qualname__


def test_untraced_calls_record_nothing_and_uninstrument_restores_the_libraries() -> None:
    import aiocache.base
    import cashews

    cache = SimpleMemoryCache()
    traced_get = aiocache.base.BaseCache.get
    assert asyncio.run(cache.get("nothing")) is None  # outside any request: a plain call

    uninstrument("aiocache", "cashews")
    assert aiocache.base.BaseCache.get is traced_get.__wrapped__
    assert all("asynctrace" not in repr(m) for m in cashews.cache._default_middlewares)

    async def body() -> None:
        await cache.set("k", 1)

    trace = run(_request(body, instrument=False))
    assert trace is not None and cache_calls(trace) == []


def test_an_instrumented_method_is_the_libraries_own_outside_traced_requests() -> None:
    """Untraced, ``cache.get(...)`` returns aiocache's own coroutine (no frame of ours in
    between), and the method still looks like what it replaced to inspect and asyncio."""
    import inspect

    import aiocache.base

    instrument("aiocache")
    method = aiocache.base.BaseCache.get
    original = method.__wrapped__
    cache = SimpleMemoryCache()
    coro = cache.get("k")
    try:
        assert coro.cr_code is original.__code__
    finally:
        coro.close()
    assert method.__name__ == "get" and method.__doc__ == original.__doc__
    assert asyncio.iscoroutinefunction(cache.get)
    assert inspect.signature(cache.get) == inspect.signature(original.__get__(cache))
    assert asyncio.run(cache.get("nothing", default=3)) == 3


def _keyed_forms() -> list[str]:
    from asgi_asynctrace import _context

    return ["python", "c"] if _context._CKeyedCall is not None else ["python"]


@pytest.mark.parametrize("form", _keyed_forms())
def test_aiocache_keyed_calls_are_recorded_alike_in_c_and_in_python(
    form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the accelerator, a keyed call (get, exists, delete, set, add) of a cache class
    already named is recorded in C (``KeyedCall``), with no Python frame; what it records is
    what the Python form records, whatever the key's type or how the rest of the call is
    given (a write's ttl by keyword, by position, not at all, or not a number)."""
    import importlib

    import aiocache.base

    from asgi_asynctrace import _context

    ours = importlib.import_module("asgi_asynctrace.instrumentation.aiocache")
    uninstrument("aiocache")
    if form == "python":
        monkeypatch.setattr(_context, "_CKeyedCall", None)
    instrument("aiocache")
    for op in ("get", "exists", "delete", "set", "add"):
        traced_side = getattr(aiocache.base.BaseCache.__dict__[op], "traced", None)
        assert (type(traced_side).__name__ == "KeyedCall") == (form == "c")

    async def body() -> None:
        cache = SimpleMemoryCache(namespace="keyed:")
        # the first call names the class (the Python form, either way); then the class is known
        assert await cache.get("warm") is None
        assert type(cache) in ours._backends
        assert await cache.get("user:1") is None
        await cache.set("user:1", "ada")
        await cache.set("user:2", "bob", ttl=30)
        await cache.set("user:3", "cy", 2.5)
        await cache.add("user:4", "di", ttl=True)  # not a number: no ttl, as in Python
        await cache.add("user:5", "ed", 60)
        assert await cache.get("user:1", namespace="keyed:") == "ada"
        assert await cache.get(42, default=7) == 7  # not a str: named by str()
        assert await cache.exists("user:1") is True
        assert await cache.delete(key="user:1") == 1  # by keyword: the Python form's part
        assert await cache.get("user:1") is None

    trace = traced(body)
    backend = "aiocache:memory"
    got = [(t, only(n, "backend", "op", "key", "hit", "ttl")) for t, n in cache_calls(trace)]
    assert got == [
        ("cache-get", {"backend": backend, "op": "get", "key": "warm", "hit": False}),
        ("cache-get", {"backend": backend, "op": "get", "key": "user:1", "hit": False}),
        ("cache-put", {"backend": backend, "op": "set", "key": "user:1"}),
        ("cache-put", {"backend": backend, "op": "set", "key": "user:2", "ttl": 30}),
        ("cache-put", {"backend": backend, "op": "set", "key": "user:3", "ttl": 2.5}),
        ("cache-put", {"backend": backend, "op": "add", "key": "user:4"}),
        ("cache-put", {"backend": backend, "op": "add", "key": "user:5", "ttl": 60}),
        ("cache-get", {"backend": backend, "op": "get", "key": "user:1", "hit": True}),
        ("cache-get", {"backend": backend, "op": "get", "key": "42", "hit": True}),
        ("cache-get", {"backend": backend, "op": "exists", "key": "user:1", "hit": True}),
        ("cache-delete", {"backend": backend, "op": "delete", "key": "user:1"}),
        ("cache-get", {"backend": backend, "op": "get", "key": "user:1", "hit": False}),
    ]  # fmt: skip
    calls = [r for r in trace.resources if r.type in CACHE_TYPES]
    assert all(r.state == "ok" and r.trigger_id == trace.root.async_id for r in calls)


@pytest.mark.parametrize("form", _keyed_forms())
def test_a_key_that_cannot_be_named_leaves_its_call_unrecorded_and_the_app_unaffected(
    form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from asgi_asynctrace import _context, failure_counts

    uninstrument("aiocache")
    if form == "python":
        monkeypatch.setattr(_context, "_CKeyedCall", None)
    instrument("aiocache")

    class Key:
        """A key whose name fails once: when the tracer asks it (the library asks after)."""

        asked = 0

        def __str__(self) -> str:
            Key.asked += 1
            if Key.asked == 1:
                raise ValueError("no name yet")
            return "named"

    async def body() -> None:
        cache = SimpleMemoryCache()
        await cache.get("warm")  # names the class
        assert await cache.get(Key(), default=5) == 5

    trace = traced(body)
    assert [n.get("key") for _, n in cache_calls(trace)] == ["warm"]
    assert failure_counts() == {"aiocache": 1}
