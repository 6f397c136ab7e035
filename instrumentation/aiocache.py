"""aiocache calls as ``cache-get`` / ``cache-put`` / ``cache-delete`` resources.

    asgi_asynctrace.instrument("aiocache")     # the middleware does this by default

Every cache built on aiocache's ``BaseCache`` (its memory, Redis and Memcached backends,
and the ``@cached`` decorators, which call them) records one resource per call:

    get, multi_get, exists            -> cache-get     (hit / hits)
    set, multi_set, add, increment,
    expire                            -> cache-put     (ttl)
    delete, clear                     -> cache-delete

Annotations: ``backend`` (``aiocache:memory``, ``aiocache:redis``, ...), ``op``, ``key``
(truncated like every annotation) or ``keys`` (how many), ``hit`` for reads, ``ttl`` for
writes when one is given, and ``error`` when the call raised. aiocache's plugins are set per
cache instance, so they cannot cover caches the app builds itself: the public methods of
``BaseCache`` are wrapped instead, and put back by ``uninstrument("aiocache")``.
Supports aiocache >= 0.12. Exports: AiocacheInstrumentation, instrumentation.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from asgi_asynctrace._context import Done, call_recorder, found, keyed_recorder
from asgi_asynctrace._failures import report

from ._base import Instrumentation
from ._patch import untraced_fast_path

__all__ = ["AiocacheInstrumentation", "instrumentation"]

_OPS = {
    "get": "cache-get",
    "multi_get": "cache-get",
    "exists": "cache-get",
    "set": "cache-put",
    "multi_set": "cache-put",
    "add": "cache-put",
    "increment": "cache-put",
    "expire": "cache-put",
    "delete": "cache-delete",
    "clear": "cache-delete",
}


# What a call's result adds: whether a read found its key(s).
_DONE: dict[str, Done] = {
    "get": found,
    "exists": lambda result: {"hit": bool(result)},
    "multi_get": lambda result: {"hits": sum(v is not None for v in result or ())},
}


# A cache class -> its backend's name as annotated ("aiocache:memory", ...).
_backends: dict[type, str] = {}


def _backend(cache: Any) -> str:
    name = f"aiocache:{getattr(cache, 'NAME', type(cache).__name__)}"
    if len(_backends) < 256:
        _backends[type(cache)] = name
    return name


def _notes(op: str, rtype: str, cache: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    notes: dict[str, Any] = {"backend": _backends.get(type(cache)) or _backend(cache), "op": op}
    first = args[0] if args else kwargs.get("keys", kwargs.get("pairs", kwargs.get("key")))
    if op in ("multi_get", "multi_set"):
        notes["keys"] = len(first) if first is not None else 0
    elif op != "clear" and first is not None:
        notes["key"] = str(first)
    ttl = kwargs.get("ttl", args[2] if op in ("set", "add") and len(args) > 2 else None)
    if op == "expire":
        ttl = kwargs.get("ttl", args[1] if len(args) > 1 else None)
    if rtype == "cache-put" and isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        notes["ttl"] = ttl
    return notes


def _wrap(op: str, rtype: str, original: Callable[..., Any]) -> Callable[..., Any]:
    done = _DONE.get(op)
    record = call_recorder()
    keyed = op in ("get", "exists", "delete")  # (key, namespace=None, ...): notes made here

    def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
        call = original(self, *args, **kwargs)  # the library's own coroutine, as untraced
        try:
            if keyed and args and args[0] is not None:  # _notes() without its frame
                notes = {"backend": _backends.get(type(self)) or _backend(self), "op": op,
                         "key": str(args[0])}  # fmt: skip
            else:
                notes = _notes(op, rtype, self, args, kwargs)
        except Exception as exc:
            report("aiocache", exc)
            return call
        return record(rtype, call, notes, done)

    # A keyed call, or a write by key, of a cache class already named: recorded in C, with
    # no frame of traced's. (self, key, value, ttl): a write's ttl is at position 3.
    fast = None
    if keyed or op in ("set", "add"):
        ttl_at = -1 if keyed else 3
        fast = keyed_recorder(rtype, op, original, traced, _backends, done, "aiocache", ttl_at)
    return untraced_fast_path(original, fast or traced)  # type: ignore[no-any-return]


class AiocacheInstrumentation(Instrumentation):
    name = "aiocache"
    library = "aiocache"
    supported = (0, 12)

    def _install(self, module: ModuleType) -> None:
        base = module.BaseCache
        for op, rtype in _OPS.items():
            self.patches.replace(base, op, _wrap(op, rtype, getattr(base, op)))


instrumentation = AiocacheInstrumentation()
