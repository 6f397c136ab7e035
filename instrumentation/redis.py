"""redis.asyncio commands as key-value resources: kv-get, kv-put, kv-delete, kv-list.

    asgi_asynctrace.instrument("redis")       # the middleware does this by default

Every command sent through ``redis.asyncio.Redis`` (and so through libraries built on it, such
as aiocache's and cashews' Redis backends) records one resource:

    GET MGET HGET HGETALL EXISTS TTL LRANGE SMEMBERS ZRANGE ...   -> kv-get   (hit / hits)
    SET MSET HSET EXPIRE INCR LPUSH SADD ZADD ...                 -> kv-put   (ttl for SET .. EX)
    DEL UNLINK HDEL SREM ZREM GETDEL ...                          -> kv-delete
    SCAN KEYS HSCAN SSCAN ZSCAN                                   -> kv-list
    anything else (PING, PUBLISH, EVAL, ...)                      -> kv-command

A pipeline or transaction is one ``kv-pipeline`` resource listing its commands. Annotations:
``command``, ``key`` (truncated like every annotation) or ``keys`` (how many), ``hit`` /
``hits``, ``ttl``, ``error``; values are never recorded. redis-py has no per-command hook, so
``Redis.execute_command`` and ``Pipeline.execute`` are wrapped, and put back by
``uninstrument("redis")``. Supports redis-py >= 5. Exports: RedisInstrumentation, instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from asgi_asynctrace import start_resource
from asgi_asynctrace._context import Done, found, record_call
from asgi_asynctrace._failures import report

from ._base import Instrumentation
from ._patch import untraced_fast_path

__all__ = ["RedisInstrumentation", "instrumentation"]

_TYPES: dict[str, str] = {}
for _names, _type in (
    ("GET MGET HGET HMGET HGETALL HEXISTS HLEN HKEYS HVALS EXISTS STRLEN GETRANGE TTL PTTL TYPE "
     "LRANGE LLEN LINDEX SMEMBERS SISMEMBER SMISMEMBER SCARD ZRANGE ZRANGEBYSCORE ZREVRANGE "
     "ZSCORE ZCARD ZRANK ZCOUNT GETEX OBJECT", "kv-get"),
    ("SET SETEX PSETEX SETNX MSET MSETNX GETSET HSET HSETNX HMSET HINCRBY HINCRBYFLOAT EXPIRE "
     "PEXPIRE EXPIREAT PEXPIREAT PERSIST INCR INCRBY INCRBYFLOAT DECR DECRBY APPEND LPUSH RPUSH "
     "LSET LTRIM SADD ZADD ZINCRBY SETRANGE", "kv-put"),
    ("DEL UNLINK HDEL SREM ZREM LREM GETDEL LPOP RPOP SPOP ZPOPMIN ZPOPMAX", "kv-delete"),
    ("SCAN KEYS HSCAN SSCAN ZSCAN", "kv-list"),
):  # fmt: skip
    for _name in _names.split():
        _TYPES[_name] = _type
_SINGLE_HIT = {"GET", "HGET", "GETEX", "GETDEL", "GETRANGE", "LINDEX", "ZSCORE"}
_MULTI_HIT = {"MGET", "HMGET"}
_MULTI_KEY = {"MGET", "DEL", "UNLINK", "EXISTS", "MSET", "MSETNX"}
_MAX_LISTED = 20


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _ttl(name: str, args: Sequence[Any]) -> float | None:
    try:
        if name in ("SETEX", "PSETEX", "EXPIRE", "PEXPIRE") and len(args) > 2:
            seconds = float(args[2])
            return seconds / 1000 if name[0] == "P" else seconds
        if name == "SET":
            words = [_text(a).upper() for a in args[3:]]
            for flag, scale in (("EX", 1.0), ("PX", 0.001)):
                if flag in words:
                    return float(_text(args[3 + words.index(flag) + 1])) * scale
    except (ValueError, IndexError):
        return None
    return None


def _any_hit(result: Any) -> dict[str, Any]:
    return {"hit": bool(result)}


def _hits(result: Any) -> dict[str, Any] | None:
    return {"hits": sum(v is not None for v in result)} if isinstance(result, list) else None


def _done(name: str) -> Done | None:
    if name in _SINGLE_HIT:  # {"hit": result is not None}, which the C record makes itself
        return found
    if name in ("EXISTS", "HEXISTS", "SISMEMBER"):
        return _any_hit
    return _hits if name in _MULTI_HIT else None


def _command_notes(name: str, rtype: str, args: tuple[Any, ...]) -> dict[str, Any]:
    notes: dict[str, Any] = {"command": name}
    if name in _MULTI_KEY:
        notes["keys"] = (len(args) - 1) // 2 if name.startswith("MSET") else len(args) - 1
    elif len(args) > 1 and rtype != "kv-command" and name not in ("SCAN", "KEYS"):
        notes["key"] = _text(args[1])
    ttl = _ttl(name, args) if rtype == "kv-put" else None
    if ttl is not None:
        notes["ttl"] = ttl
    return notes


def _wrap_command(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_command(self: Any, *args: Any, **options: Any) -> Any:
        call = original(self, *args, **options)  # redis-py's own coroutine, as untraced
        if not args:
            return call
        try:
            name = _text(args[0]).upper()
            rtype = _TYPES.get(name, "kv-command")
            notes = _command_notes(name, rtype, args)
        except Exception as exc:
            report("redis", exc)
            return call
        return record_call(rtype, call, notes, _done(name))

    return untraced_fast_path(original, execute_command)  # type: ignore[no-any-return]


def _wrap_pipeline(original: Callable[..., Any]) -> Callable[..., Any]:
    async def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        stack = getattr(self, "command_stack", None) or []
        if not stack:
            return await original(self, *args, **kwargs)
        names = [_text(entry[0][0]).upper() for entry in stack if entry and entry[0]]
        listed = ",".join(names[:_MAX_LISTED]) + (",…" if len(names) > _MAX_LISTED else "")
        transaction = bool(getattr(self, "is_transaction", False)
                           or getattr(self, "explicit_transaction", False))  # fmt: skip
        with start_resource("kv-pipeline", commands=listed, count=len(names),
                            transaction=transaction):  # fmt: skip
            return await original(self, *args, **kwargs)

    return untraced_fast_path(original, execute)  # type: ignore[no-any-return]


class RedisInstrumentation(Instrumentation):
    name = "redis"
    library = "redis"
    supported = (5,)

    def _install(self, module: ModuleType) -> None:
        from redis.asyncio.client import Pipeline, Redis

        self.patches.replace(Redis, "execute_command", _wrap_command(Redis.execute_command))
        self.patches.replace(Pipeline, "execute", _wrap_pipeline(Pipeline.execute))


instrumentation = RedisInstrumentation()
