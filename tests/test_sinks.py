"""The response header's codec: what it writes is the trace, whatever was cached before."""

from __future__ import annotations

import base64
import random
import threading
import time
import zlib
from typing import Any

import orjson
import pytest

from asgi_asynctrace import Trace, decode_trace_header, failure_counts
from asgi_asynctrace._context import ACTIVE, ResourceScope
from asgi_asynctrace._sinks import _tables, encode_trace_header, trace_header

from .test_model import _python_core_trace


def _raw(value: str) -> bytes:
    packed = value.removeprefix("z1:")
    return zlib.decompress(base64.urlsafe_b64decode(packed + "=" * (-len(packed) % 4)))


def _get(n: int) -> None:  # a cache call site of its own
    with ResourceScope("cache-get", key=f"k{n}"):
        pass


def _put(n: int) -> None:
    with ResourceScope("cache-put", key=f"k{n}"):
        pass


def _traced(cls: type[Trace], calls: list[Any], label: str) -> Trace:
    trace = cls.start(request={"method": "GET", "path": label})
    token = ACTIVE.set((trace, trace.root))
    try:
        for i, call in enumerate(calls):
            call(i)
    finally:
        ACTIVE.reset(token)
    trace.annotate(trace.root, "label", label)
    trace.finish(time.perf_counter_ns(), "ok")
    return trace


@pytest.mark.parametrize("core", ["c", "python"])
def test_the_header_holds_the_trace_as_to_json_writes_it_cached_table_or_not(core: str) -> None:
    cls = Trace if core == "c" else _python_core_trace()
    _tables.clear()
    # one call site, so the same stacks: the second trace's table comes from the cache; the
    # third has the same stacks in another order, so a table of its own
    first, again, other = [
        _traced(cls, calls, label)
        for calls, label in [
            ([_get, _put, _get], "/first"),
            ([_get, _put, _get], "/again"),
            ([_put, _get], "/other"),
        ]
    ]
    for trace in (first, again, other):
        assert len(trace.stacks) >= 2
        decoded = decode_trace_header(trace_header(trace))
        assert decoded == orjson.loads(trace.to_json())
        assert list(decoded) == list(trace.to_dict())  # shown in the model's order
    assert len(_tables) == 2
    # the stream is one zlib stream: its checksum and end are checked by zlib itself
    assert orjson.loads(_raw(trace_header(again)))["request"]["path"] == "/again"


def test_the_cached_head_is_padded_to_whole_base64_groups_with_empty_stored_blocks() -> None:
    # The head (zlib header and the compressed stack table) is cached as base64 text, which
    # joins with the rest's only when the head is a multiple of 3 bytes: empty stored blocks
    # pad it. Every remainder must give a header that zlib itself reads back whole.
    from asgi_asynctrace._sinks import _ZLIB_HEAD, _deflate

    _tables.clear()
    seen = set()
    for n in range(1, 40):
        trace = Trace.start(request={"method": "GET", "path": f"/{n}"})
        for i in range(n):
            sid = trace.stack_id(f"site{i}", (f"f{i} @ app.py:{i * 7}:{n}",))
            trace.add("cache-get", 1, sid, trace.origin + i)
        trace.finish(trace.origin + 10**6)
        head = _ZLIB_HEAD + _deflate(b'{"stackTraces":' + trace.stack_table_json() + b",")
        seen.add(len(head) % 3)
        value = trace_header(trace)
        assert orjson.loads(_raw(value)) == orjson.loads(trace.to_json())
        assert decode_trace_header(value) == orjson.loads(trace.to_json())
        assert value == trace_header(trace)  # the second time from the cached head
    assert seen == {0, 1, 2}


def test_a_stack_frame_json_cannot_hold_is_written_as_to_json_writes_it() -> None:
    before = failure_counts().get("serialize", 0)
    trace = Trace.start()
    trace.stacks.append(("bad \udcff frame @ x.py:1:1",))
    trace.finish(time.perf_counter_ns(), "ok")
    assert decode_trace_header(trace_header(trace)) == orjson.loads(trace.to_json())
    assert failure_counts().get("serialize", 0) > before


def test_reused_compressors_never_let_one_header_depend_on_another() -> None:
    rng = random.Random(7)
    words = [b'"asyncId":', b'"type":"cache-get"', b"null,", b'{"key":', b"12345", b"]}"]
    for size in [0, 1, 100, 5_000, 40_000, 70_000, *[rng.randrange(20_000) for _ in range(60)]]:
        data = b"".join(rng.choice(words) for _ in range(size // 8)) + rng.randbytes(size % 8)
        assert _raw(encode_trace_header(data)) == data


def test_headers_made_on_several_threads_at_once_are_each_their_own() -> None:
    wrong: list[bytes] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(150):
            data = orjson.dumps({"seed": seed, "values": [rng.random() for _ in range(300)]})
            if _raw(encode_trace_header(data)) != data:
                wrong.append(data)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def _finished(path: str, status: int) -> Trace:
    trace = Trace.start(request={"method": "GET", "path": path})
    trace.request["status"] = status
    trace.add("timer", 1, None, trace.origin + 5)
    trace.finish(trace.origin + 1_000, "error" if status >= 500 else "ok")
    return trace


def test_the_store_summarises_a_trace_the_same_before_and_after_it_is_read() -> None:
    from asgi_asynctrace._sinks import TraceStore

    store = TraceStore(max_traces=3)
    kept, given = _finished("/a", 200), _finished("/b", 503)
    store(kept)  # kept as the Trace: summarised when listed
    store(given, given.to_json())  # the JSON given with it: summarised at once
    before = store.summaries()
    assert [s["path"] for s in before] == ["/b", "/a"]  # newest first
    assert before[1] == {
        "traceId": kept.trace_id, "method": "GET", "path": "/a", "status": 200, "state": "ok",
        "startedAtUnixNs": kept.started_at_unix_ns, "durationNs": 1_000, "resources": 2,
    }  # fmt: skip
    assert before[0]["state"] == "error" and before[0]["resources"] == 2
    assert store.get(kept.trace_id) == kept.to_json() == store.get(kept.trace_id)
    assert store.summaries() == before  # read: its JSON kept, its place and summary unchanged
    for path in ("/c", "/d"):
        store(_finished(path, 200))
    assert [s["path"] for s in store.summaries()] == ["/d", "/c", "/b"]
    assert store.get(kept.trace_id) is None and len(store) == 3
