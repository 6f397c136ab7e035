"""cashews calls as ``cache-get`` / ``cache-put`` / ``cache-delete`` resources.

    asgi_asynctrace.instrument("cashews")      # the middleware does this by default

Recorded through cashews' own extension point, a cache middleware: it is added to the
global ``cashews.cache`` and to every ``Cache`` made while the instrumentation is on, so
direct calls and the decorators (``@cache``, ``@cache.early``, ``@cache.hit``, ...) alike
record one resource per command. Reads (get, get_many, exists, scan, ...) are ``cache-get``
with ``hit`` / ``hits``; writes (set, set_many, incr, expire, set_lock, ...) are
``cache-put`` with ``ttl`` when given; delete, delete_many, delete_match, clear and unlock
are ``cache-delete``. Also annotated: ``backend`` (``cashews:Memory``, ``cashews:Redis``,
...), ``op``, ``key`` or ``keys``, and ``error``. ``ping`` is not recorded.
Supports cashews >= 7. Exports: CashewsInstrumentation, instrumentation.
"""

from __future__ import annotations

import weakref
from types import ModuleType
from typing import Any

from asgi_asynctrace import start_resource
from asgi_asynctrace._context import ACTIVE

from ._base import Instrumentation

__all__ = ["CashewsInstrumentation", "instrumentation"]

_PUT = {"set", "set_raw", "set_many", "incr", "expire", "set_lock", "incr_bits",
        "slice_incr", "set_add"}  # fmt: skip
_DELETE = {"delete", "delete_many", "delete_match", "clear", "unlock", "set_remove", "set_pop"}
_SKIP = {"ping"}


async def asynctrace_middleware(
    call: Any, cmd: Any, backend: Any, *args: Any, **kwargs: Any
) -> Any:
    """A cashews middleware recording each command as a cache resource."""
    op = getattr(cmd, "value", str(cmd))
    if ACTIVE.get() is None or op in _SKIP:
        return await call(*args, **kwargs)
    rtype = "cache-put" if op in _PUT else "cache-delete" if op in _DELETE else "cache-get"
    notes: dict[str, Any] = {"backend": f"cashews:{type(backend).__name__}", "op": op}
    if "key" in kwargs:
        notes["key"] = str(kwargs["key"])
    elif "keys" in kwargs:
        notes["keys"] = len(kwargs["keys"])
    elif "pairs" in kwargs:
        notes["keys"] = len(kwargs["pairs"])
    elif "pattern" in kwargs:
        notes["key"] = str(kwargs["pattern"])
    ttl = kwargs.get("expire")
    if rtype == "cache-put" and isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        notes["ttl"] = ttl
    with start_resource(rtype, **notes) as scope:
        result = await call(*args, **kwargs)
        if op in ("get", "get_raw"):
            scope.annotate("hit", result is not None and result is not kwargs.get("default"))
        elif op == "exists":
            scope.annotate("hit", bool(result))
        elif op == "get_many":
            scope.annotate("hits", sum(v is not None for v in result or ()))
        return result


class CashewsInstrumentation(Instrumentation):
    name = "cashews"
    library = "cashews"
    supported = (7,)

    def __init__(self) -> None:
        super().__init__()
        self._caches: weakref.WeakSet[Any] = weakref.WeakSet()

    def _add(self, cache: Any) -> None:
        middlewares = cache._default_middlewares
        if asynctrace_middleware not in middlewares:
            middlewares.append(asynctrace_middleware)
            self._caches.add(cache)

    def _install(self, module: ModuleType) -> None:
        from cashews.wrapper.wrapper import Wrapper

        original_init = Wrapper.__init__
        add = self._add

        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original_init(self, *args, **kwargs)
            add(self)

        self.patches.replace(Wrapper, "__init__", __init__)
        self._add(module.cache)

    def uninstall(self) -> None:
        for cache in list(self._caches):
            if asynctrace_middleware in cache._default_middlewares:
                cache._default_middlewares.remove(asynctrace_middleware)
        self._caches = weakref.WeakSet()
        super().uninstall()


instrumentation = CashewsInstrumentation()
