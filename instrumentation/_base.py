"""The shape every instrumentation module shares.

    class HttpxInstrumentation(Instrumentation):
        name, library, supported = "httpx", "httpx", (0, 27)
        def _install(self, module): ...   # patch, or nothing when the library has a hook

``install()`` and ``uninstall()`` are idempotent and never raise into the app: a missing or
too-old library is logged once and skipped. Exports: Instrumentation.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import re
from types import ModuleType

from ._patch import Patches

__all__ = ["Instrumentation"]

logger = logging.getLogger("asgi_asynctrace")


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _installed_version(module: ModuleType, library: str) -> str:
    """The module's ``__version__``, else its distribution's (some libraries set none)."""
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "0"


class Instrumentation:
    name: str = ""
    library: str = ""
    supported: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.patches = Patches()
        self.installed = False

    def install(self) -> bool:
        """Turn the instrumentation on; False (and one log line) when it cannot be."""
        if self.installed:
            return True
        try:
            module = importlib.import_module(self.library)
        except ImportError:
            logger.info("asgi-asynctrace: %s is not installed; %s skipped", self.library, self.name)
            return False
        text = _installed_version(module, self.library)
        if _version_tuple(text) < self.supported:
            wanted = ".".join(map(str, self.supported))
            logger.warning(
                "asgi-asynctrace: %s %s is older than %s; %s skipped",
                self.library,
                text,
                wanted,
                self.name,
            )
            return False
        try:
            self._install(module)
        except Exception:
            self.patches.restore()
            logger.warning("asgi-asynctrace: installing %s failed", self.name, exc_info=True)
            return False
        self.installed = True
        return True

    def uninstall(self) -> None:
        self.patches.restore()
        self.installed = False

    def _install(self, module: ModuleType) -> None:
        raise NotImplementedError
