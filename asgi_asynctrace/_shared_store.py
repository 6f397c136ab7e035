"""The trace store shared by an app's worker processes, through a directory.

    shared = SharedDirectory("/run/asynctrace", keep=100, summarize=record_of_json)
    shared.put(trace_id, data)        # written by a thread of its own, never on the loop
    shared.get(trace_id)              # another worker's trace: its JSON, or None

Under ``uvicorn --workers 4`` (or gunicorn) each process has its own in-memory store, and a
request for ``/__asynctrace/traces/<id>`` lands on whichever process the kernel picks: without
a shared place, three times in four the trace is "not in the store". With ``store_dir`` every
worker also writes each finished trace to ``<dir>/<trace id>.json`` (written to a hidden
temporary name and renamed, so a reader never sees half a file), and reads there what its own
memory does not hold. The newest ``keep`` files stay; older ones are removed as new ones come.
Files are made readable by their owner only: traces hold URLs, statements and stacks.
Exports: SharedDirectory.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from ._failures import report

__all__ = ["SharedDirectory"]

_TRACE_ID: Final = re.compile(r"[0-9A-Za-z_-]{1,64}")
_BACKLOG: Final = 1000  # traces waiting for the writer thread; beyond that, counted and dropped


class SharedDirectory:
    """Finished traces as files in a directory every worker process of the app writes to."""

    def __init__(
        self, path: str | os.PathLike[str], keep: int, summarize: Callable[[bytes], dict[str, Any]]
    ) -> None:
        """``summarize``: a trace's list record from its JSON (for the other workers' files)."""
        self.path = Path(path)
        self._summarize = summarize
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"store_dir {str(path)!r} cannot be made: {exc}") from None
        if not self.path.is_dir() or not os.access(self.path, os.W_OK | os.X_OK):
            raise ValueError(f"store_dir {str(path)!r} is not a directory this process can write")
        self.keep = keep
        self._prune_every = max(1, keep // 8)
        self._written = 0
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(_BACKLOG)
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        # trace id -> (the file's mtime, its list record): a file is parsed once, not per list
        self._summaries: dict[str, tuple[int, dict[str, Any]]] = {}

    def put(self, trace_id: str, data: bytes) -> None:
        """Queue the trace for the writer thread (started with the first trace)."""
        if not _TRACE_ID.fullmatch(trace_id):
            return
        if self._thread is None:
            with self._start:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="asynctrace-store-dir", daemon=True
                    )
                    self._thread.start()
        try:
            self._queue.put_nowait((trace_id, data))
        except queue.Full:
            report("store-dir", RuntimeError(f"{_BACKLOG} traces waiting to be written"))

    def flush(self) -> None:
        """Wait until every queued trace is written (tests; a process about to exit)."""
        if self._thread is not None:
            self._queue.join()

    def _run(self) -> None:
        while True:
            trace_id, data = self._queue.get()
            try:
                self._write(trace_id, data)
            except Exception as exc:
                report("store-dir", exc)
            finally:
                self._queue.task_done()

    def _write(self, trace_id: str, data: bytes) -> None:
        temporary = self.path / f".{trace_id}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temporary, self.path / f"{trace_id}.json")
        self._written += 1
        if self._written % self._prune_every == 0:
            self._prune()

    def _files(self) -> list[tuple[int, str, str]]:
        """(mtime, trace id, path) of every trace file, oldest first."""
        out = []
        with os.scandir(self.path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(".") or not name.endswith(".json"):
                    continue
                try:
                    out.append((entry.stat().st_mtime_ns, name[:-5], entry.path))
                except FileNotFoundError:  # another worker removed it meanwhile
                    continue
        out.sort()
        return out

    def _prune(self) -> None:
        files = self._files()
        for _, _, path in files[: max(0, len(files) - self.keep)]:
            with contextlib.suppress(FileNotFoundError):  # another worker's prune took it
                os.unlink(path)

    def get(self, trace_id: str) -> bytes | None:
        """The trace's JSON as some worker wrote it, or None."""
        if not _TRACE_ID.fullmatch(trace_id):
            return None
        try:
            return (self.path / f"{trace_id}.json").read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:  # unreadable, the directory gone: as if not there, and said once
            report("store-dir", exc)
            return None

    def summaries(self, skip: set[str]) -> list[dict[str, Any]]:
        """A list record for each trace file but those in ``skip`` (this worker's own), newest
        last; a file that cannot be read as a trace is left out."""
        out = []
        seen = {}
        try:
            files = self._files()[-self.keep :]
        except OSError as exc:  # the directory gone or unreadable: this worker's own traces only
            report("store-dir", exc)
            return []
        for mtime, trace_id, path in files:
            if trace_id in skip:
                continue
            cached = self._summaries.get(trace_id)
            if cached is None or cached[0] != mtime:
                try:
                    with open(path, "rb") as f:
                        cached = (mtime, self._summarize(f.read()))
                except (OSError, ValueError):  # gone meanwhile, or not a trace
                    continue
            seen[trace_id] = cached
            out.append(cached[1])
        self._summaries = seen
        return out
