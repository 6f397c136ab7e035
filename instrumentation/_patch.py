"""One place that replaces attributes of other libraries and puts the originals back.

    patches = Patches()
    patches.replace(httpx.AsyncClient, "__init__", traced_init)
    patches.restore()          # everything back, in reverse order

Exports: Patches.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Patches"]

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
