"""Traces out of logs and files: the ``AsyncTrace completed; toJson() = `` lines, trace JSON,
JSON lines; plain, gzip or stdin; streamed, so a multi-GB log runs in constant memory.

    for source, line, item in extract(["server.log.gz"]): ...   # item: JSON bytes or an error
    for where, trace in read_traces("traces.jsonl"): ...
    for where, trace in read_traces("http://127.0.0.1:8000"): ...   # a running app's store

Exports: extract, read_traces, StoreReader, LOG_MARKER.
"""

from __future__ import annotations

import gzip
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO

import orjson

from ._load import TraceFormatError, load_trace
from ._model import Trace
from ._sinks import LOG_PREFIX

__all__ = ["LOG_MARKER", "StoreReader", "extract", "read_traces"]

LOG_MARKER = LOG_PREFIX.encode()
_PREFIX = LOG_MARKER
Progress = Callable[[str, int, int, int], None]  # (name, bytes read, size, traces so far)


def _open(name: str) -> BinaryIO:
    if name == "-":
        return sys.stdin.buffer
    stream = open(name, "rb")  # noqa: SIM115 - closed by the caller
    if stream.peek(2)[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=stream)  # type: ignore[return-value]
    return stream


def extract(
    names: Sequence[str], progress: Progress | None = None
) -> Iterator[tuple[str, int, bytes | str]]:
    """(source, line number, trace JSON bytes or an error message) for each trace line.

    ``progress(name, bytes_read, size, traces)`` is called every few thousand lines.
    """
    for name in names:
        stream = _open(name)
        raw = getattr(stream, "fileobj", None) or stream  # a gzip file's compressed bytes
        size = _size(name)
        found = 0
        try:
            for number, line in enumerate(stream, 1):
                if progress is not None and number % 4096 == 0:
                    progress(name, _tell(raw), size, found)
                at = line.find(_PREFIX)
                if at < 0:
                    continue
                data = line[at + len(_PREFIX) :].rstrip()
                try:
                    doc = orjson.loads(data)
                except orjson.JSONDecodeError as exc:
                    yield name, number, f"malformed or cut trace ({exc})"
                    continue
                if not isinstance(doc, dict) or "resources" not in doc:
                    yield name, number, "not a trace object"
                    continue
                found += 1
                yield name, number, data
        finally:
            if progress is not None:
                progress(name, size, size, found)
            if stream is not sys.stdin.buffer:
                stream.close()


def read_traces(name: str, secret: str | None = None) -> Iterator[tuple[str, Trace]]:
    """Every trace in a file: one JSON trace, JSON lines (``extract``'s output), or a log; or
    in a running app's trace store, given its address (``http://127.0.0.1:8000``, the app,
    or ``…/__asynctrace``, the store; ``secret``: the app's, where it has one).

    Yields (where, trace); raises TraceFormatError naming the file and line of a bad one.
    """
    if name.startswith(("http://", "https://")):
        yield from _from_store(name, secret)
        return
    stream = _open(name)
    try:
        data = stream.read()
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()
    text = data.lstrip()
    if not text:
        raise TraceFormatError(f"{name}: empty, no trace in it")
    if text.startswith(b"{"):
        try:
            yield name, load_trace(orjson.loads(text))
            return
        except orjson.JSONDecodeError:
            pass  # not one JSON document: JSON lines or a log, below
        except TraceFormatError as exc:
            raise TraceFormatError(f"{name}: {exc}") from None
    found = 0
    for number, line in enumerate(data.splitlines(), 1):
        at = line.find(_PREFIX)
        body = line[at + len(_PREFIX) :] if at >= 0 else line.strip()
        if not body.startswith(b"{"):
            continue
        try:
            trace = load_trace(orjson.loads(body))
        except (orjson.JSONDecodeError, TraceFormatError) as exc:
            raise TraceFormatError(f"{name}:{number}: {exc}") from None
        found += 1
        yield f"{name}:{number}", trace
    if not found:
        raise TraceFormatError(f"{name}: no trace found (expected trace JSON, JSON lines or a log)")


class StoreReader:
    """A running app's trace store over HTTP: ``url`` is the app's address (its store at the
    default ``/__asynctrace``) or the store's own; ``secret`` the app's, where it has one."""

    def __init__(self, url: str, secret: str | None = None) -> None:
        from urllib.parse import urlsplit

        import httpx

        base = url.rstrip("/")
        if urlsplit(url).path in ("", "/"):  # the app's own address: the default prefix
            base += "/__asynctrace"
        self.base = base
        self._headers = {"X-Async-Trace": secret or "1", "Accept": "application/json"}
        self._client = httpx.Client(timeout=60)

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def _get(self, url: str) -> Any:
        import httpx

        try:
            return self._client.get(url, headers=self._headers)
        except httpx.HTTPError as exc:
            raise OSError(f"{url}: {exc}") from None

    def _json(self, path: str, what: str) -> Any:
        """The store's JSON answer at ``path``; a TraceFormatError saying what may be wrong
        when it gives none (``what``: what was asked for)."""
        got = self._get(f"{self.base}{path}")
        if got.status_code != 200 or not got.headers.get("content-type", "").startswith(
            "application/json"
        ):
            raise TraceFormatError(
                f"{self.base}{path} answered {got.status_code}, not {what}: is "
                "AsyncTraceMiddleware's store on (store_size > 0) at that path_prefix, and may "
                "this client read it (from loopback, or with the app's --secret)?"
            )
        return orjson.loads(got.content)

    def ids(self) -> list[str]:
        """The stored traces' ids, newest first."""
        listed = self._json("/traces", "a list of traces")
        return [str(t.get("traceId")) for t in listed.get("traces", [])]

    def status(self) -> dict[str, Any]:
        """What the tracer in the process that answers is set to and has done."""
        return dict(self._json("/status", "the tracer's status"))

    def trace(self, trace_id: str) -> tuple[str, Trace] | None:
        """(where, the trace); None when it has left the store."""
        where = f"{self.base}/traces/{trace_id}"
        got = self._get(where)
        if got.status_code == 404:
            return None
        if got.status_code != 200:
            raise TraceFormatError(f"{where} answered {got.status_code}: {got.text[:200]}")
        try:
            return where, load_trace(orjson.loads(got.content))
        except (orjson.JSONDecodeError, TraceFormatError) as exc:
            raise TraceFormatError(f"{where}: {exc}") from None


def _from_store(url: str, secret: str | None) -> Iterator[tuple[str, Trace]]:
    """The traces a running app's store holds, newest first (one that left the store after
    the list was made is passed over)."""
    with StoreReader(url, secret) as store:
        ids = store.ids()
        if not ids:
            raise TraceFormatError(f"{store.base}: the store holds no trace yet")
        for trace_id in ids:
            found = store.trace(trace_id)
            if found is not None:
                yield found


def _size(name: str) -> int:
    try:
        return os.path.getsize(name) if name != "-" else 0
    except OSError:
        return 0


def _tell(stream: object) -> int:
    try:
        return int(stream.tell())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return 0
