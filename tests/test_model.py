from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_asynctrace import (
    Trace,
    TraceFormatError,
    TraceLimits,
    failure_counts,
    frame_origin,
    load_trace,
)
from asgi_asynctrace._stacks import ACCELERATED

STATES_DRAWN = ["ok", "error", "cancelled"]

SEED_SAMPLE = {
    "requestDurationNs": 5_000_000,
    "resources": [
        {"asyncId": 1, "triggerId": 0, "type": "root", "stackTraceId": 0, "createdAt": 0,
         "callbackStartedAt": 0, "callbackEndedAt": 5_000_000, "destroyedAt": 0},
        {"asyncId": 2, "triggerId": 1, "type": "kFetch", "stackTraceId": 0, "createdAt": 1000,
         "callbackStartedAt": 2_000_000, "callbackEndedAt": 2_100_000, "destroyedAt": 2_100_000},
        {"asyncId": 3, "triggerId": 1, "type": "jsPromise", "stackTraceId": 7, "createdAt": 1500,
         "callbackStartedAt": 0, "callbackEndedAt": 0, "destroyedAt": 0},
    ],
    "stackTraces": [{"id": 0, "frames": ["handler @ worker.js:10:5"]}],
    "annotations": [{"asyncId": 2, "key": "url", "value": "https://example.com"}],
}  # fmt: skip


def _sample() -> Trace:
    trace = Trace(trace_id="t1", request={"method": "GET", "path": "/x"}, origin=1000)
    root = trace.add("root", 0, None, 1000)
    assert root is not None
    child = trace.add("fetch", 1, trace.stack_id("k", ("f @ app.py:1:1",)), 1500)
    assert child is not None
    trace.begin(root, 1000)
    trace.end(root, 1200)
    trace.begin(root, 3000)
    trace.end(root, 3100)
    trace.annotate(child, "url", "https://api.example/x")
    trace.settle(child, 2500, "ok")
    trace.finish(3100)
    return trace


def test_to_dict_writes_format_v1_with_times_relative_to_the_request_start() -> None:
    doc = _sample().to_dict()
    assert doc["version"] == 1
    assert doc["requestDurationNs"] == 2100
    root, child = doc["resources"]
    assert root == {
        "asyncId": 1, "triggerId": 0, "type": "root", "stackTraceId": None, "createdAt": 0,
        "callbackStartedAt": 0, "callbackEndedAt": 2100, "destroyedAt": 2100,
        "callbacks": [[0, 200], [2000, 2100]], "state": "ok",
    }  # fmt: skip
    assert child["createdAt"] == 500 and child["destroyedAt"] == 1500
    assert child["callbackStartedAt"] is None and child["callbacks"] == []
    assert doc["stackTraces"] == [{"id": 0, "frames": ["f @ app.py:1:1"]}]
    assert doc["annotations"] == [{"asyncId": 2, "key": "url", "value": "https://api.example/x"}]


def test_a_v1_trace_survives_a_round_trip_through_json_unchanged() -> None:
    first = _sample().to_json()
    again = load_trace(first).to_json()
    assert orjson.loads(again) == orjson.loads(first)


def test_a_running_step_is_written_with_a_null_end() -> None:
    trace = Trace(origin=0)
    res = trace.add("task", 0, None, 0)
    assert res is not None
    trace.begin(res, 10)
    trace.ended_at = 20
    assert trace.to_dict()["resources"][0]["callbacks"] == [[10, None]]
    assert load_trace(trace.to_json()).to_dict()["resources"][0]["callbacks"] == [[10, None]]


def test_resources_over_the_cap_are_dropped_and_counted() -> None:
    trace = Trace(limits=TraceLimits(max_resources=3))
    made = [trace.add("task", 0, None, i) for i in range(5)]
    assert [r.async_id for r in made if r is not None] == [1, 2, 3]
    assert made[3:] == [None, None]
    assert trace.to_dict()["dropped"]["resources"] == 2


def test_annotations_and_callbacks_over_their_caps_are_dropped_and_counted() -> None:
    limits = TraceLimits(
        max_annotations_per_resource=2, max_annotation_length=5, max_callbacks_per_resource=2
    )
    trace = Trace(limits=limits)
    res = trace.add("task", 0, None, 0)
    assert res is not None
    trace.annotate(res, "a", "0123456789")
    trace.annotate(res, "b", 1)
    trace.annotate(res, "c", 2)
    for t in range(0, 100, 10):
        trace.begin(res, t)
        trace.end(res, t + 1)
    doc = trace.to_dict()
    assert doc["annotations"][0]["value"] == "01234…"
    assert len(doc["annotations"]) == 2
    assert doc["resources"][0]["callbacks"] == [[0, 1], [10, 11]]
    assert doc["dropped"] == {
        "resources": 0, "annotations": 1, "callbacks": 8, "stacks": 0, "truncatedValues": 1,
    }  # fmt: skip


def test_stacks_are_deduplicated_by_key() -> None:
    trace = Trace()
    a = trace.stack_id(("k", 1), ("f @ a.py:1:1",))
    b = trace.stack_id(("k", 1), ("f @ a.py:1:1",))
    c = trace.stack_id(("k", 2), ("g @ a.py:2:1",))
    assert (a, b, c) == (0, 0, 1)
    assert len(trace.to_dict()["stackTraces"]) == 2


class _Key:
    """A stack key that compares by identity, as the hooks' cached stacks do."""

    __slots__ = ()


@pytest.mark.parametrize("core", ["c", "python"])
def test_stack_keys_by_identity_and_by_value_each_keep_their_own_index(core: str) -> None:
    # The C core finds its first 32 identity keys by a pointer scan and the rest in the dict:
    # across that line, and mixed with keys that compare by value, every key keeps one index.
    if core == "c" and not ACCELERATED:
        pytest.skip("the C accelerator was not built")
    trace = (Trace if core == "c" else _python_core_trace())()
    keys = [_Key() for _ in range(40)]
    first = {}
    for i, key in enumerate(keys):
        first[i] = trace.stack_id(key, (f"f{i} @ a.py:{i}:1",))
        if i % 5 == 0:  # a key that compares by value, made anew each time it is asked for
            assert trace.stack_id(("by-value", i), (f"v{i} @ b.py:{i}:1",)) is not None
    for i in reversed(range(40)):
        assert trace.stack_id(keys[i], ("never stored",)) == first[i]
        if i % 5 == 0:
            again = trace.stack_id(("by-value", i), ("never stored",))
            assert again is not None and trace.stacks[again] == (f"v{i} @ b.py:{i}:1",)
    assert len(trace.stacks) == 48 and len(set(first.values())) == 40
    assert all(trace.stacks[first[i] or 0] == (f"f{i} @ a.py:{i}:1",) for i in range(40))
    assert None not in first.values()


@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")
def test_the_c_core_reads_the_clock_perf_counter_ns_reads() -> None:
    import time

    for _ in range(1000):
        before = time.perf_counter_ns()
        trace = Trace.start()
        res = trace.new_resource("task", trace.root, 0)
        after = time.perf_counter_ns()
        assert res is not None and before <= trace.origin <= res.created_at <= after


def test_only_the_first_settlement_counts() -> None:
    trace = Trace()
    res = trace.add("future", 0, None, 0)
    assert res is not None
    trace.settle(res, 5, "cancelled")
    trace.settle(res, 9, "ok")
    assert (res.state, res.settled_at) == ("cancelled", 5)


def test_the_seed_runtime_json_loads_with_its_zeros_read_as_never() -> None:
    trace = load_trace(orjson.dumps(SEED_SAMPLE))
    doc = trace.to_dict()
    root, fetch, promise = doc["resources"]
    assert root["state"] == "ok" and root["destroyedAt"] == 5_000_000
    assert root["callbacks"] == [[0, 5_000_000]]
    assert fetch["type"] == "fetch" and fetch["callbacks"] == [[2_000_000, 2_100_000]]
    assert fetch["stackTraceId"] == 0
    assert promise["type"] == "js-promise"
    assert promise["state"] == "pending" and promise["callbacks"] == []
    assert promise["stackTraceId"] is None  # its stack 7 is not in the table
    assert trace.annotations_of(2) == {"url": "https://example.com"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "a trace is a JSON object"),
        (b'{"version": 2}', "unsupported trace format version 2"),
        (b'{"version": 1, "resources": []}', "missing 'requestDurationNs'"),
        (
            b'{"version": 1, "requestDurationNs": 5, "resources": [{"asyncId": "x"}]}',
            "resources[0].asyncId: expected int",
        ),
        (b'{"hello": 1}', "no 'version' and no 'resources'"),
    ],
)
def test_bad_input_gets_an_error_that_says_what_and_where(data: bytes, message: str) -> None:
    with pytest.raises(TraceFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_trace(data)


def test_limits_reject_nonsense() -> None:
    with pytest.raises(ValueError, match="max_resources must be an int >= 1"):
        TraceLimits(max_resources=0)


@pytest.mark.parametrize(
    ("frame", "origin"),
    [
        ("handler @ app/routes.py:4:5", "app"),
        ("Route.handle @ site-packages/starlette/routing.py:289:13", "dependency"),
        ("sleep @ <stdlib>/asyncio/tasks.py:644:14", "runtime"),
    ],
)
def test_frames_tell_the_apps_code_from_dependencies_and_the_runtime(
    frame: str, origin: str
) -> None:
    assert frame_origin(frame) == origin


# -- the C writer and the Python path write the same bytes ------------------------------------

_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)  # JSON-encodable
_VALUES = st.one_of(
    st.none(), st.booleans(), _TEXT, st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip


@st.composite
def _traces(draw: st.DrawFn) -> Trace:
    origin = draw(st.integers(0, 2**40))
    trace = Trace(trace_id="t", request={"method": "GET", "path": draw(_TEXT)}, origin=origin)
    root = trace.add("root", 0, None, origin)
    assert root is not None
    made = [root]
    for _ in range(draw(st.integers(0, 12))):
        parent = draw(st.sampled_from(made))
        sid = draw(st.none() | st.integers(0, 3))
        frames = (f"f{sid} @ app.py:{sid}:1", draw(_TEXT))  # the second one hostile text
        stack = None if sid is None else trace.stack_id(sid, frames)
        at = origin + draw(st.integers(-5, 10**12))  # a clock read just before the origin too
        res = trace.add(
            draw(st.sampled_from(["task", "fetch", 'ty"pe\n', "tâche"])), parent.async_id, stack, at
        )
        assert res is not None
        made.append(res)
        for t in sorted(draw(st.lists(st.integers(0, 10**9), max_size=7))):
            trace.begin(res, at + t) if len(res.callbacks) % 2 == 0 else trace.end(res, at + t)
        if draw(st.booleans()):
            trace.settle(
                res, at + draw(st.integers(0, 10**9)), draw(st.sampled_from(["ok", "error"]))
            )
        if draw(st.booleans()):
            res.awaited_by = draw(st.lists(st.integers(1, 99), min_size=1, max_size=3))
        for key, value in draw(st.lists(st.tuples(_TEXT, _VALUES), max_size=3)):
            trace.annotate(res, key, value)
    if draw(st.booleans()):
        trace.resources.reverse()  # written sorted by id whatever the order they were added in
    trace.finish(origin + 10**13)
    return trace


@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")
@settings(max_examples=300, deadline=None)
@given(_traces())
def test_the_c_writer_writes_the_bytes_the_python_path_writes(trace: Trace) -> None:
    assert trace.to_json() == orjson.dumps(trace.to_dict())


def test_values_json_cannot_hold_are_written_escaped_and_the_trace_kept() -> None:
    trace = _sample()
    child = trace.resources[1]
    trace.annotate(child, "file", "caf\udce9.txt")  # a filename decoded with surrogateescape
    trace.annotate(child, "huge", 2**70)
    before = failure_counts().get("serialize", 0)
    doc = orjson.loads(trace.to_json())
    values = {a["key"]: a["value"] for a in doc["annotations"]}
    assert values == {"url": "https://api.example/x", "file": "caf\\udce9.txt", "huge": str(2**70)}
    assert failure_counts()["serialize"] == before + 1
    assert failure_counts().get("serialize-accelerated", 0) == 0


@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")
def test_the_c_resource_is_the_python_record_without_the_collectors_cost() -> None:
    import gc

    from asgi_asynctrace._recording import Resource, _PyResource

    assert Resource is not _PyResource
    c, py = Resource(7, 1, "fetch", None, 100), _PyResource(7, 1, "fetch", None, 100)
    names = ("async_id", "trigger_id", "type", "stack_id", "created_at", "callbacks",
             "settled_at", "state", "annotation_count", "awaited_by")  # fmt: skip
    assert [getattr(c, n) for n in names] == [getattr(py, n) for n in names]
    assert repr(c) == repr(py) == "<Resource 7 fetch <-1 pending>"
    # a record the collector never counts or walks: it cannot be part of a cycle
    assert not gc.is_tracked(c) and gc.is_tracked(py)
    for r in (c, py):
        r.callbacks.extend([10, 20, 30])
        r.state, r.settled_at, r.awaited_by = "ok", 40, [2]
        r.annotation_count += 1
    assert [getattr(c, n) for n in names] == [getattr(py, n) for n in names]
    assert c.intervals() == py.intervals() == [(10, 20), (30, None)]
    keyword = Resource(async_id=2, trigger_id=1, type="task", stack_id=0, created_at=5)
    assert (keyword.async_id, keyword.stack_id, keyword.created_at) == (2, 0, 5)
    with pytest.raises(TypeError):
        Resource(1, 0, "task")  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        c.colour = "red"  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        del c.callbacks


@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")
def test_a_resource_that_never_ran_a_callback_has_no_list_until_asked() -> None:
    trace = Trace(trace_id="t", origin=0)
    res = trace.add("future", 0, None, 5)
    assert res is not None
    assert not hasattr(res, "_callbacks")  # the raw field: unset
    out = orjson.loads(trace.to_json())["resources"][0]
    assert out["callbacks"] == [] and out["callbackStartedAt"] is None
    assert not hasattr(res, "_callbacks")  # writing the trace made none
    assert res.callbacks == [] and res._callbacks == []  # type: ignore[attr-defined]


def _python_core_trace() -> type[Trace]:
    """Trace standing on the pure-Python recording core (what runs without the accelerator)."""
    import types

    from asgi_asynctrace._recording import _PyTraceCore

    skip = {"__slots__", "__dict__", "__weakref__", "__module__", "__qualname__"}
    body = {
        k: v
        for k, v in vars(Trace).items()
        if k not in skip and not isinstance(v, types.MemberDescriptorType)
    }
    return type("Trace", (_PyTraceCore,), {**body, "__slots__": Trace.__slots__})


def _make(trace: Trace, parent_of: Any) -> Any:  # one call site, so one stack, for both
    return trace.new_resource("task", parent_of, 0)


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.integers(0, 9)),
        st.tuples(st.just("add"), st.integers(0, 9), st.sampled_from(["fetch", "timer"])),
        st.tuples(st.just("begin"), st.integers(0, 9), st.integers(0, 10**6)),
        st.tuples(st.just("end"), st.integers(0, 9), st.integers(0, 10**6)),
        st.tuples(st.just("settle"), st.integers(0, 9), st.sampled_from(STATES_DRAWN)),
        st.tuples(st.just("annotate"), st.integers(0, 9), _TEXT, _VALUES),
        st.tuples(st.just("annotate-object"), st.integers(0, 9)),
        st.tuples(st.just("stack"), st.integers(0, 3)),
    ),
    max_size=40,
)


@pytest.mark.skipif(not ACCELERATED, reason="the C accelerator was not built")
@settings(max_examples=200, deadline=None)
@given(ops=_OPS, caps=st.tuples(*(st.integers(1, n) for n in (6, 3, 8, 3, 3)), st.integers(0, 4)))
def test_the_c_recording_core_records_what_the_python_one_records(ops: Any, caps: Any) -> None:
    from asgi_asynctrace._recording import _PyTraceCore

    limits = TraceLimits(max_resources=caps[0], max_callbacks_per_resource=caps[1],
                         max_annotations_per_resource=caps[2], max_annotation_length=caps[3],
                         max_stacks=caps[4], max_stack_depth=caps[5])  # fmt: skip
    python = _python_core_trace()
    assert isinstance(python(), _PyTraceCore) and not isinstance(Trace(), _PyTraceCore)
    out = []
    for cls in (Trace, python):
        trace = cls(trace_id="t", origin=0, limits=limits)
        root = trace.add("root", 0, None, 0)
        assert root is not None
        made = [root]
        for op in ops:
            res: Any = made[op[1] % len(made)]
            if op[0] == "new":
                got = _make(trace, res)
            elif op[0] == "add":
                got = trace.add(op[2], res.async_id, None, op[1])
            elif op[0] == "begin":
                trace.begin(res, op[2])
            elif op[0] == "end":
                trace.end(res, op[2])
            elif op[0] == "settle":
                trace.settle(res, op[1], op[2])
            elif op[0] == "annotate":
                trace.annotate(res, op[2], op[3])
            elif op[0] == "annotate-object":
                trace.annotate(res, "thing", {"a": [1, 2]})  # type: ignore[arg-type]
            else:
                trace.stack_id(f"k{op[1]}", (f"f{op[1]} @ app.py:1:1",))
            if op[0] in ("new", "add") and got is not None:
                made.append(got)
        trace.finish(10**7)
        doc = orjson.loads(trace.to_json())
        for r in doc["resources"]:  # created now: the clock differs between the two runs
            if r["type"] == "task":
                r["createdAt"] = 0
        out.append((doc, trace._next_id))
    assert out[0] == out[1]


@pytest.mark.parametrize("core", ["c", "python"])
def test_a_trace_survives_copy_deepcopy_and_pickle(core: str) -> None:
    import copy
    import pickle

    cls = Trace if core == "c" else _python_core_trace()

    def made() -> Trace:
        trace = cls.start(request={"method": "GET", "path": "/x"})
        task = trace.new_resource("task", trace.root, 0)
        assert task is not None
        trace.begin(task, trace.origin + 5)
        trace.annotate(task, "coroutine", "work")
        fut = trace.new_resource("future", task, 0)
        assert fut is not None
        fut.awaited_by = [task.async_id]
        trace.settle(fut, trace.origin + 9, "ok")
        trace.finish(trace.origin + 20)
        return trace

    ways: list[Any] = [copy.copy, copy.deepcopy]
    if core == "c":  # a class made in a test cannot be pickled by name
        ways.append(lambda t: pickle.loads(pickle.dumps(t)))
    for way in ways:
        trace = made()
        again = way(trace)
        assert type(again) is type(trace)
        assert again.to_json() == trace.to_json()
        assert [r.intervals() for r in again.resources] == [r.intervals() for r in trace.resources]
        expected = len(again.resources) + 1  # (a shallow copy shares the lists, as ever)
        added = again.new_resource("task", again.root, 0)  # a copy records on
        assert added is not None and added.async_id == expected


def test_trace_ids_are_random_w3c_sized_and_never_repeat_across_threads() -> None:
    import re
    import threading

    got: list[list[str]] = [[] for _ in range(4)]

    def start(into: list[str]) -> None:
        into.extend(Trace.start().trace_id for _ in range(3_000))  # the pool refills often

    threads = [threading.Thread(target=start, args=(into,)) for into in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for into in got for i in into]
    assert len(ids) == 12_000 and len(set(ids)) == 12_000
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)


def test_limits_past_a_machine_integer_are_no_limit_and_each_trace_reads_its_own() -> None:
    import sys

    tight, loose = TraceLimits(max_resources=2), TraceLimits(max_resources=10**30)
    for _ in range(2):  # the second time from what was worked out the first
        a, b = Trace.start(limits=tight), Trace.start(limits=loose)
        for _ in range(3):
            a.add("cache-get", 1, None, 0)
            b.add("cache-get", 1, None, 0)
        assert (len(a.resources), a.dropped.resources) == (2, 2)  # the root is one of the 2
        assert (len(b.resources), b._max_resources) == (4, sys.maxsize)


@pytest.mark.skipif(not ACCELERATED, reason="the C core is not built")
def test_a_trace_started_in_one_c_call_is_the_trace_init_and_add_make() -> None:
    from asgi_asynctrace._model import _TRACE_FIELDS

    def state(trace: Trace) -> dict[str, Any]:
        got = {name: getattr(trace, name) for name in _TRACE_FIELDS}
        got["finishers"], got["_stack_ids"] = trace.finishers, trace._stack_ids
        got["dropped"] = trace.dropped.to_dict()
        got["resources"] = [(r.async_id, r.trigger_id, r.type, r.stack_id, r.state,
                             r.settled_at, r.awaited_by) for r in trace.resources]  # fmt: skip
        return got

    limits = TraceLimits(max_resources=7, max_stack_depth=3, max_annotation_length=10**30)
    cases: list[dict[str, Any]] = [
        {}, {"limits": limits, "request": {"path": "/x"}, "trace_id": "ab" * 16}
    ]  # fmt: skip
    for kwargs in cases:
        fast = Trace.start(**kwargs)
        origin, unix_ns = fast.origin, fast.started_at_unix_ns
        slow = Trace(trace_id=fast.trace_id, request=kwargs.get("request"), origin=origin,
                     started_at_unix_ns=unix_ns, limits=kwargs.get("limits"))  # fmt: skip
        slow.add("root", 0, None, origin)
        assert state(fast) == state(slow)
        assert fast.root.created_at == origin and type(fast) is Trace
        # each trace its own lists, dicts and Dropped
        other = Trace.start(**kwargs)
        for name in ("resources", "annotations", "stacks", "_stack_ids", "finishers",
                     "propagate_to", "dropped"):  # fmt: skip
            assert getattr(fast, name) is not getattr(other, name)
        if "request" not in kwargs:
            assert fast.request == {} and fast.request is not other.request


def test_a_trace_class_with_its_own_init_is_started_through_it() -> None:
    made: list[str] = []

    class Labelled(Trace):
        __slots__ = ("label",)

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.label = "mine"
            made.append(self.trace_id)

    trace = Labelled.start(request={"path": "/y"})
    assert type(trace) is Labelled and trace.label == "mine" and made == [trace.trace_id]
    assert trace.root.type == "root" and trace.request == {"path": "/y"}

    class Counted(Trace):
        __slots__ = ()

        def add(self, *args: Any) -> Any:
            made.append(args[0])
            return super().add(*args)

    counted = Counted.start()
    assert made[-1] == "root" and counted.root.type == "root"  # its own add made the root
