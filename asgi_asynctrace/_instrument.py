"""Turning library instrumentation on and off by name.

    instrument()                 # every instrumentation whose library is installed
    instrument("httpx")          # just that one
    uninstrument()

The modules live in ``asgi_asynctrace.instrumentation``; they are imported here only when
asked for, so importing the tracer never imports an instrumented library.
Exports: instrument, uninstrument, instrumentation_states.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
import threading
from types import ModuleType
from typing import Any

from ._failures import report

__all__ = ["instrument", "instrumentation_states", "uninstrument"]

_PACKAGE = "asgi_asynctrace.instrumentation"
logger = logging.getLogger("asgi_asynctrace")


def _available() -> list[str]:
    names: list[str] = importlib.import_module(_PACKAGE).available()
    return names


def _instrumentation(name: str) -> Any | None:
    if name not in _available():
        raise ValueError(f"no instrumentation {name!r}; available: {', '.join(_available())}")
    try:
        return importlib.import_module(f"{_PACKAGE}.{name}").instrumentation
    except ImportError as exc:
        logger.info("asgi-asynctrace: %s instrumentation skipped (%s)", name, exc)
        return None


# The library each instrumentation module instruments, where it is not the module's own name
# (known here so that waiting for a library needs no import of its instrumentation module).
_LIBRARY = {"timers": "asyncio"}


def instrument(*names: str) -> dict[str, bool]:
    """Install the named instrumentations (all available when none is named).

    Returns which ones are now on; a library that is missing or too old is skipped with one
    log line, never an exception. An unknown name is a ValueError. With no name, a library the
    app has not imported yet is not imported for it: its instrumentation goes on the moment
    the app first imports it (so an installed library the app never uses costs nothing).
    """
    result = {}
    for name in names or _available():
        library = _LIBRARY.get(name, name)
        if not names and library not in sys.modules and importlib.util.find_spec(library):
            _after_import.wait_for(library, name)
            result[name] = False
            continue
        module = _instrumentation(name)
        result[name] = module is not None and bool(module.install())
    return result


def instrumentation_states() -> dict[str, str]:
    """Each instrumentation's state, for the store's status: ``on``, ``off``, ``waiting for
    import`` (its library not yet imported by the app) or ``not installed``. Imports nothing."""
    with _after_import.lock:
        waiting = {n for names in _after_import.waiting.values() for n in names}
    states = {}
    for name in _available():
        module = sys.modules.get(f"{_PACKAGE}.{name}")
        if getattr(getattr(module, "instrumentation", None), "installed", False):
            states[name] = "on"
        elif name in waiting:
            states[name] = "waiting for import"
        elif _LIBRARY.get(name, name) not in sys.modules and not importlib.util.find_spec(
            _LIBRARY.get(name, name)
        ):
            states[name] = "not installed"
        else:
            states[name] = "off"
    return states


def uninstrument(*names: str) -> None:
    """Undo ``instrument()`` for the named instrumentations (all when none is named)."""
    for name in names or _available():
        _after_import.forget(name)
        module = _instrumentation(name)
        if module is not None:
            module.uninstall()


def _install_now(name: str) -> None:
    try:
        module = _instrumentation(name)
        if module is not None:
            module.install()
    except Exception as exc:  # never into the app's import
        report(f"instrument:{name}", exc)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Installs an instrumentation the moment the app first imports its library.

    On ``sys.meta_path`` only while some library is awaited. It finds nothing itself: for an
    awaited name it asks the finders after it, and wraps the loader they give so the
    instrumentation is installed right after the library's module has run; the module's
    ``__loader__`` and ``__spec__.loader`` are then given back the real loader.
    """

    def __init__(self) -> None:
        self.waiting: dict[str, list[str]] = {}  # library -> instrumentation names
        self.lock = threading.Lock()

    def wait_for(self, library: str, name: str) -> None:
        with self.lock:
            names = self.waiting.setdefault(library, [])
            if name not in names:
                names.append(name)
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)

    def forget(self, name: str) -> None:
        with self.lock:
            for library, names in list(self.waiting.items()):
                if name in names:
                    names.remove(name)
                if not names:
                    del self.waiting[library]
            self._step_aside_if_idle()

    def _step_aside_if_idle(self) -> None:  # under the lock
        if not self.waiting and self in sys.meta_path:
            sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self.waiting:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            with self.lock:
                names = self.waiting.pop(fullname, [])
                self._step_aside_if_idle()
            spec.loader = _ThenInstall(loader, names)
        return spec


class _ThenInstall:
    """A loader that runs the real one, then installs the waiting instrumentations."""

    def __init__(self, loader: Any, names: list[str]) -> None:
        self._loader = loader
        self._names = names

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self._loader.exec_module(module)
        finally:
            spec: Any = module.__spec__
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
        for name in self._names:
            _install_now(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


_after_import = _AfterImport()
