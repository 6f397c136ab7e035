"""One place that replaces attributes of other libraries and puts the originals back.

    patches = Patches()
    patches.replace(httpx.AsyncClient, "__init__", traced_init)
    patches.restore()          # everything back, in reverse order

Exports: Patches, untraced_fast_path.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["Patches", "untraced_fast_path"]

_MISSING = object()


class Patches:
    def __init__(self) -> None:
        self._originals: list[tuple[Any, str, Any]] = []

    def replace(self, owner: Any, name: str, value: Any) -> Any:
        """Set ``owner.name = value``; returns what was there (looked up the normal way)."""
        self._originals.append((owner, name, owner.__dict__.get(name, _MISSING)))
        original = getattr(owner, name)
        setattr(owner, name, value)
        return original

    def restore(self) -> None:
        while self._originals:
            owner, name, original = self._originals.pop()
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    def __bool__(self) -> bool:
        return bool(self._originals)


def untraced_fast_path(original: Any, record: Any) -> Any:
    """A replacement for an async method that costs one ContextVar read outside traced requests.

    Outside a traced request a call returns ``original(...)``'s coroutine itself; inside one,
    ``record(...)``'s. It is the hooks' ``dispatch`` (in C when the accelerator is built: no
    Python frame at all on the untraced side), carrying ``original``'s name, docstring and
    ``__wrapped__``, and still reported as a coroutine function by ``inspect`` and ``asyncio``.
    """
    from asgi_asynctrace._tasks import dispatch, mark_coroutine_function

    wrapper = dispatch(original, record)
    functools.update_wrapper(wrapper, original)
    mark_coroutine_function(wrapper)
    return wrapper
