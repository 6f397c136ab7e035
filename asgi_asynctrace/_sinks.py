"""Where finished traces go: the stderr log line, the in-memory store, the response header.

    store = TraceStore(max_traces=100)
    LogSink()(trace, trace.to_json())      # AsyncTrace completed; toJson() = {...}
    decode_trace_header(response.headers["x-async-trace-data"])   # -> dict (format v1)

A sink is any callable taking the trace and its JSON bytes (``TraceSink``). Sinks only read
the model; the middleware calls each one inside a guard, so a failing sink never reaches the
app. The JSON is made only when a sink asks for it: one that reads only the ``Trace`` says so
with ``needs_json = False`` and gets ``None`` unless another sink needed the bytes anyway;
the log line asks only while its logger logs INFO; the store keeps a trace as it is and writes
its JSON when it is first read. The response header is written by ``trace_header``, which
reuses a route's compressed stack table from one request to the next; ``header_room`` says how
much of it fits where a proxy reads the headers. Exports: HEADER_BLOCK, LOG_PREFIX, LogSink,
TraceSink, TraceStore, capture_traces, decode_trace_header, encode_trace_header, header_room,
trace_header.
"""

from __future__ import annotations

import base64
import logging
import os
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, Final, Protocol

import orjson

from ._load import load_trace
from ._model import Trace
from ._shared_store import SharedDirectory

__all__ = [
    "HEADER_BLOCK",
    "HEADER_PREFIX",
    "LOG_PREFIX",
    "LogSink",
    "TraceSink",
    "TraceStore",
    "capture_traces",
    "decode_trace_header",
    "encode_trace_header",
    "header_room",
    "trace_header",
]

LOG_PREFIX: Final = "AsyncTrace completed; toJson() = "
HEADER_PREFIX: Final = "z1:"
# A reverse proxy reads a response's status line and headers into one buffer and answers 502
# when they do not fit: nginx's proxy_buffer_size is one memory page, 4 KiB on x86-64 (and on
# most arm64 systems). By default a trace goes inline only while the whole block still fits.
HEADER_BLOCK: Final = 4096
# What the server puts around the app's headers: the status line, date, server, and
# content-length or transfer-encoding (uvicorn's come to about 100 bytes).
_SERVER_ADDS: Final = 192
_DATA_LINE: Final = len(b"x-async-trace-data: \r\n")


def header_room(headers: Any) -> int:
    """How many bytes of ``X-Async-Trace-Data`` fit beside ``headers`` (the response's own,
    as ASGI gives them: (name, value) byte pairs) in a block of ``HEADER_BLOCK`` bytes."""
    used = _SERVER_ADDS + 2 + sum(len(name) + len(value) + 4 for name, value in headers)
    return max(0, HEADER_BLOCK - used - _DATA_LINE)


class TraceSink(Protocol):
    """Receives every finished trace with its format-v1 JSON.

    A sink may have ``needs_json`` (an attribute or property): when it is false, the sink is
    called with ``data=None`` unless another sink needed the JSON made; when absent, true.
    """

    def __call__(self, trace: Trace, data: bytes, /) -> None: ...


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time of the record."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


class LogSink:
    """Logs ``AsyncTrace completed; toJson() = {...}`` at INFO, one line per trace.

    The logger is ``asgi_asynctrace.trace``. When logging is not configured at all (plain
    uvicorn configures only its own loggers) the line goes straight to stderr; once the app
    configures logging, the line follows that configuration instead.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("asgi_asynctrace.trace")
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(logging.INFO)
        self._fallback: logging.Handler | None = None

    @property
    def needs_json(self) -> bool:
        """Only while the line would be logged: a logger set above INFO costs no JSON."""
        return self.logger.isEnabledFor(logging.INFO)

    def __call__(self, trace: Trace, data: bytes | None, /) -> None:
        if data is None:  # called though it said it did not need the JSON: make it here
            if not self.needs_json:
                return
            data = trace.to_json()
        logger = self.logger
        if self._fallback is None and not logger.hasHandlers():
            self._fallback = _CurrentStderr()
            self._fallback.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(self._fallback)
        logger.info("%s%s", LOG_PREFIX, data.decode())


class TraceStore:
    """The most recent traces, newest last; old ones fall out when ``max_traces`` is reached.

    Given a trace without its JSON, the store keeps the finished ``Trace`` itself and writes
    the JSON when the trace is first read: a trace nobody opens costs no serialization, and
    its summary is made only when the list of traces is asked for.

    With a ``directory`` (the middleware's ``store_dir``) the store is shared by the app's
    worker processes: each also writes every trace's JSON there (from a thread of its own), and
    reads there the traces its memory does not hold. Then it needs every trace's JSON.
    """

    def __init__(
        self, max_traces: int = 100, directory: str | os.PathLike[str] | None = None
    ) -> None:
        if max_traces < 1:
            raise ValueError(f"max_traces must be at least 1, got {max_traces}")
        self.max_traces = max_traces
        # trace id -> the finished Trace until it is first read, then (its summary, its JSON)
        self._items: OrderedDict[str, Trace | tuple[dict[str, Any], bytes]] = OrderedDict()
        self._lock = threading.Lock()
        self.shared = (
            None if directory is None else SharedDirectory(directory, max_traces, _summary_of_json)
        )
        self.needs_json = self.shared is not None

    def __call__(self, trace: Trace, data: bytes | None = None, /) -> None:
        kept = trace if data is None else (_summary(trace), data)
        with self._lock:
            items = self._items
            items[trace.trace_id] = kept
            while len(items) > self.max_traces:
                items.popitem(last=False)
        if self.shared is not None:
            self.shared.put(trace.trace_id, trace.to_json() if data is None else data)

    def get(self, trace_id: str) -> bytes | None:
        """The trace's JSON, or None when the store does not hold it (any more). With a
        shared directory this may read a file: call it off the event loop."""
        with self._lock:
            kept = self._items.get(trace_id)
        if kept is None:
            return None if self.shared is None else self.shared.get(trace_id)
        if isinstance(kept, tuple):
            return kept[1]
        data = kept.to_json()  # the trace is finished: nothing records into it any more
        read = (_summary(kept), data)
        with self._lock:  # from now on the bytes, unless the trace fell out meanwhile
            if self._items.get(trace_id) is kept:
                self._items[trace_id] = read
        return data

    def trace(self, trace_id: str) -> Trace | None:
        """The trace as a ``Trace``: the one kept when nobody read it yet (nothing serialized,
        nothing changed), else loaded from its JSON; None when the store does not hold it.
        With a shared directory this may read a file: call it off the event loop."""
        with self._lock:
            kept = self._items.get(trace_id)
        if isinstance(kept, Trace):
            return kept
        data = kept[1] if kept is not None else self.get(trace_id)
        return None if data is None else load_trace(data)

    def holds(self, trace_id: str) -> bool:
        """Whether this process's own memory holds the trace (not a shared directory)."""
        with self._lock:
            return trace_id in self._items

    def around(self, since_unix_ns: int, until_unix_ns: int) -> list[Trace]:
        """This process's own traces (never a shared directory's: other processes, other
        loops) that were running at some time between the two wall-clock moments; those
        already read are loaded again from their JSON."""
        with self._lock:
            kept = list(self._items.values())
        out = []
        for k in kept:
            summary = _summary(k) if isinstance(k, Trace) else k[0]
            start = summary.get("startedAtUnixNs") or 0
            if start > until_unix_ns or start + (summary.get("durationNs") or 0) < since_unix_ns:
                continue
            out.append(k if isinstance(k, Trace) else load_trace(k[1]))
        return out

    def summaries(self) -> list[dict[str, Any]]:
        """One small record per stored trace, newest first (with a shared directory, the
        other workers' too, the newest ``max_traces`` of all; reads files: off the loop)."""
        with self._lock:
            kept = list(reversed(self._items.values()))
            own = set(self._items) if self.shared is not None else set()
        mine = [k[0] if isinstance(k, tuple) else _summary(k) for k in kept]
        if self.shared is None:
            return mine
        every = mine + self.shared.summaries(own)
        every.sort(key=lambda s: s.get("startedAtUnixNs") or 0, reverse=True)
        return every[: self.max_traces]

    def __len__(self) -> int:
        return len(self._items)


def _summary_of_json(data: bytes) -> dict[str, Any]:
    """``_summary`` of a trace written by another worker (a ValueError when it is none)."""
    return _summary(load_trace(orjson.loads(data)))


def _summary(trace: Trace) -> dict[str, Any]:
    """What the store's list shows of a finished trace."""
    request = trace.request
    return {
        "traceId": trace.trace_id,
        "method": request.get("method"),
        "path": request.get("path"),
        "status": request.get("status"),
        "state": trace.root.state,
        "startedAtUnixNs": trace.started_at_unix_ns,
        "durationNs": trace.duration_ns,
        "resources": len(trace.resources),
    }


# The header value is one zlib stream made of raw-deflate segments, each compressed with no
# reference to the one before it and ending on a byte boundary (a full flush), which is what
# lets segments be concatenated: a trace's stack table, compressed once per distinct table and
# cached, then the rest of its JSON, compressed per request. A route's stack table is most of
# its trace (17 of 23 KB on the sample app's /cache) and the same request after request.
_KEY_ORDER: Final = ("version", "traceId", "request", "startedAtUnixNs", "requestDurationNs",
                     "resources", "stackTraces", "annotations", "dropped")  # fmt: skip
_ZLIB_HEAD: Final = b"\x78\x01"  # deflate, 32 KiB window, header check bits
_LAST_BLOCK: Final = b"\x03\x00"  # an empty final block (fixed codes: BFINAL, end of block)
# An empty stored block (not final, padded to the byte, LEN 0, NLEN 0xFFFF): adds no data. Up
# to two after the cached head make its length a multiple of 3 bytes, so the head's base64 text
# is cached too and only the per-request part is encoded (base64 of the two parts, joined, is
# base64 of the whole).
_EMPTY_STORED: Final = b"\x00\x00\x00\xff\xff"
# Kept between traces: no 256 KiB of compressor state allocated and freed for each header.
_idle_compressors: list[zlib._Compress] = []
_MAX_IDLE_COMPRESSORS: Final = 4
_tables: dict[tuple[int, ...], tuple[tuple[object, ...], str, int]] = {}
_MAX_TABLES: Final = 128


def _deflate(data: bytes | memoryview) -> bytes:
    """``data`` as raw deflate blocks that stand on their own and end on a byte boundary."""
    try:
        compressor = _idle_compressors.pop()
    except IndexError:
        # memLevel 5: a 4,096-entry hash table, which a full flush clears (the default's
        # 32,768 entries: 64 KiB cleared per header), and blocks of up to 2,048 symbols, as
        # small a compressed size on the sample app's traces (measured: 1,427 bytes against
        # 1,429 for a /cache trace's 5.8 KB) for a sixth fewer instructions
        compressor = zlib.compressobj(1, zlib.DEFLATED, -15, 5)
    # A full flush forgets everything before it: the next segment refers only to itself.
    out = compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)
    if len(_idle_compressors) < _MAX_IDLE_COMPRESSORS:
        _idle_compressors.append(compressor)
    return out


def _header_value(segments: tuple[bytes, ...], checksum: int) -> str:
    stream = b"".join((_ZLIB_HEAD, *segments, _LAST_BLOCK, checksum.to_bytes(4, "big")))
    return HEADER_PREFIX + base64.urlsafe_b64encode(stream).rstrip(b"=").decode("ascii")


def encode_trace_header(data: bytes) -> str:
    """Trace JSON as a header value: ``z1:`` + base64url (no padding) of zlib-deflated JSON."""
    return _header_value((_deflate(data),), zlib.adler32(data))


def trace_header(trace: Trace) -> str:
    """``encode_trace_header`` of the trace's JSON, written with its stack table first (the
    same document; only the key order differs) so the table's compressed and encoded form can
    be reused from the last request that had the same table."""
    stacks = trace.stacks
    key = tuple(map(id, stacks))  # the entry keeps the stacks alive, so no id is reused
    table = _tables.get(key)
    if table is None:
        data = b'{"stackTraces":' + trace.stack_table_json() + b","
        head = _ZLIB_HEAD + _deflate(data)
        head += _EMPTY_STORED * (len(head) % 3)  # 5 bytes each: then a multiple of 3
        table = (tuple(stacks), base64.urlsafe_b64encode(head).decode("ascii"), zlib.adler32(data))
        if len(_tables) >= _MAX_TABLES:
            _tables.clear()
        _tables[key] = table
    rest = memoryview(trace.json_without_stacks())[1:]  # without its "{"
    checksum = zlib.adler32(rest, table[2]).to_bytes(4, "big")
    tail = base64.urlsafe_b64encode(_deflate(rest) + _LAST_BLOCK + checksum)
    return HEADER_PREFIX + table[1] + tail.rstrip(b"=").decode("ascii")


def decode_trace_header(value: str | bytes) -> dict[str, Any]:
    """The trace dict from an ``X-Async-Trace-Data`` header value made by this library."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if not text.startswith(HEADER_PREFIX):
        raise ValueError(f"not an inline trace (it starts {text[:40]!r}): fetch it by its id")
    packed = text[len(HEADER_PREFIX) :]
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)))
        doc = orjson.loads(raw)
    except (ValueError, zlib.error) as exc:
        raise ValueError(f"damaged inline trace: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("damaged inline trace: not a JSON object")
    # in the order of Trace.to_dict() (the header writes the stack table first; see trace_header)
    ordered = {key: doc[key] for key in _KEY_ORDER if key in doc}
    ordered.update(doc)
    return ordered


_capturing: list[list[Trace]] = []


def global_sinks() -> tuple[list[Trace], ...]:
    return tuple(_capturing)


@contextmanager
def capture_traces() -> Iterator[list[Trace]]:
    """Collect every trace finished inside the block, from any middleware in this process.

    with capture_traces() as traces:
        client.get("/items", headers={"X-Async-Trace": "1"})
    assert traces[0].root.state == "ok"
    """
    collected: list[Trace] = []
    _capturing.append(collected)
    try:
        yield collected
    finally:
        # by identity: two collectors holding equal lists are still different collectors
        _capturing[:] = [c for c in _capturing if c is not collected]
