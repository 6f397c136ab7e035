"""The blocked-loop watchdog: a step of a traced request that holds the loop gets the stack of
where it was, in the trace, its JSON, the analysis and the summary."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
import time
from typing import Any

import orjson
import pytest

from asgi_asynctrace import (
    AnalysisSettings,
    AsyncTraceMiddleware,
    Trace,
    _watchdog,
    analyze,
    failure_counts,
    load_trace,
)
from asgi_asynctrace._report import format_summary
from tests.helpers import NO_EAGER_TASKS, run
from tests.helpers import _request as request_through_middleware

HERE = "tests/test_watchdog.py"


def _line(fn: Any, text: str) -> int:
    """The line of ``fn``'s source that holds ``text``."""
    import inspect

    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:  # pure Python: holds the GIL but for switch intervals
        pass


def _request(body: Any, **settings: Any) -> Trace:
    """``body`` as the handler of one traced request; its trace."""
    trace = run(_request_in_loop(body, **settings))
    return trace


async def _request_in_loop(body: Any, **settings: Any) -> Trace:
    """``_request`` on the running loop."""
    trace = await request_through_middleware(body, **settings)
    assert trace is not None
    return trace


async def _sleeps_on_the_loop() -> None:
    await asyncio.sleep(0)
    time.sleep(0.1)  # blocks the loop; lets go of the GIL


def test_a_blocking_call_in_the_request_is_sampled_where_it_blocks() -> None:
    trace = _request(_sleeps_on_the_loop)
    line = _line(_sleeps_on_the_loop, "time.sleep(0.1)")
    assert trace.samples, "no sample of a 100 ms blocking step"
    (start, end) = trace.root.intervals()[1]  # the step after the sleep(0)
    assert end is not None
    for rid, at, frames in trace.samples:
        assert rid == 1  # the root: the request's own code
        assert frames[0].startswith(f"_sleeps_on_the_loop @ {HERE}:{line}:")
        assert start + 20_000_000 <= at <= end
    # 20 ms into the step, then at twice the time the last was taken (40, 80 ms): 2 or 3
    times = [at - start for _, at, _ in trace.samples]
    assert 2 <= len(times) <= 3, times
    assert all(later >= 2 * earlier - 1_000_000 for earlier, later in itertools.pairwise(times))
    assert trace._running is None  # the step's mark is taken off as it ends
    assert failure_counts() == {}


def test_a_busy_loop_holding_the_gil_is_sampled_too() -> None:
    async def spins() -> None:
        await asyncio.sleep(0)
        _spin(0.08)

    trace = _request(spins)
    assert trace.samples
    line = _line(_spin, "while time.perf_counter() < end")
    assert trace.samples[0][2][0].startswith(f"_spin @ {HERE}:{line}:")
    # (qualified names from 3.11: "test_....<locals>.spins"; 3.10's frames have only "spins")
    assert f"spins @ {HERE}:{_line(spins, '_spin(0.08)')}:" in trace.samples[0][2][1]


def test_a_blocking_task_and_a_blocking_timer_callback_are_sampled_as_themselves() -> None:
    async def body() -> None:
        async def child() -> None:
            time.sleep(0.15)

        await asyncio.create_task(child())
        fired = asyncio.get_running_loop().create_future()

        def late() -> None:
            time.sleep(0.15)
            fired.set_result(None)

        asyncio.get_running_loop().call_later(0.001, late)
        await fired

    trace = _request(body)
    by_id = {r.async_id: r for r in trace.resources}
    sampled = {by_id[rid].type: frames for rid, _, frames in trace.samples or ()}
    assert set(sampled) == {"task", "timer"}, trace.samples
    assert "child @ " in sampled["task"][0] and "late @ " in sampled["timer"][0]
    assert f"@ {HERE}:" in sampled["task"][0] and f"@ {HERE}:" in sampled["timer"][0]


def test_short_steps_are_never_sampled() -> None:
    async def quick() -> None:
        for _ in range(20):
            time.sleep(0.002)
            await asyncio.sleep(0.003)

    trace = _request(quick)
    assert trace.samples is None


def test_blocked_sample_ms_sets_the_threshold_and_none_turns_sampling_off() -> None:
    assert _request(_sleeps_on_the_loop, blocked_sample_ms=None).samples is None
    assert _request(_sleeps_on_the_loop, blocked_sample_ms=500).samples is None
    assert _request(_sleeps_on_the_loop, blocked_sample_ms=5).samples


@pytest.mark.parametrize("bad", [0, -1, float("nan"), float("inf")])
def test_a_bad_threshold_is_refused_at_startup(bad: float) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    with pytest.raises(ValueError, match="blocked_sample_ms must be > 0 milliseconds or None"):
        AsyncTraceMiddleware(app, blocked_sample_ms=bad)


def test_samples_go_into_the_json_and_come_back_from_it() -> None:
    trace = _request(_sleeps_on_the_loop)
    doc = orjson.loads(trace.to_json())
    assert doc["samples"] == [
        {"asyncId": rid, "at": at - trace.origin, "frames": list(frames)}
        for rid, at, frames in trace.samples or ()
    ]
    assert list(doc)[-1] == "samples"  # after "dropped": readers of older traces skip it
    assert trace.to_dict()["samples"] == doc["samples"]
    again = load_trace(trace.to_json())
    assert again.samples == [(s["asyncId"], s["at"], tuple(s["frames"])) for s in doc["samples"]]
    assert orjson.loads(again.to_json())["samples"] == doc["samples"]
    # A trace that was never sampled has no "samples" at all.
    unsampled = _request(_sleeps_on_the_loop, blocked_sample_ms=None)
    assert "samples" not in orjson.loads(unsampled.to_json())
    assert "samples" not in unsampled.to_dict()


def test_a_bad_sample_in_a_file_is_a_clear_error() -> None:
    from asgi_asynctrace import TraceFormatError

    doc = orjson.loads(_request(_sleeps_on_the_loop).to_json())
    doc["samples"][0]["frames"] = [1, 2]
    with pytest.raises(TraceFormatError, match=r"samples\[0\]\.frames: expected a list of strings"):
        load_trace(doc)
    del doc["samples"][0]["at"]
    with pytest.raises(TraceFormatError, match=r"samples\[0\]: missing 'at'"):
        load_trace(doc)


def test_the_blocked_loop_finding_says_where_the_loop_was_blocked() -> None:
    trace = _request(_sleeps_on_the_loop)
    analysis = analyze(trace)
    (blocked,) = [f for f in analysis.findings if f.kind == "blocked-loop"]
    line = _line(_sleeps_on_the_loop, "time.sleep(0.1)")
    assert blocked.site.startswith(f"_sleeps_on_the_loop @ {HERE}:{line}:")
    text = format_summary(analysis)
    assert f"        at _sleeps_on_the_loop @ {HERE}:{line}:" in text
    # and the critical path says it where the request's own code ran
    (own,) = [s for s in analysis.critical_path if s.type == "root"]
    assert own.label.startswith("the request's own code ran ")
    assert own.label.endswith(f", blocked at {blocked.site}")  # (3.10 has no columns: 0)
    # Without samples the finding points where it did before: the resource's creation stack
    # (the root has none).
    unsampled = _request(_sleeps_on_the_loop, blocked_sample_ms=None)
    (before,) = [f for f in analyze(unsampled).findings if f.kind == "blocked-loop"]
    assert before.site == ""


def test_the_finding_shows_the_innermost_frame_when_a_library_blocked() -> None:
    trace = Trace.start(request={"method": "GET", "path": "/x"})
    root = trace.root
    o = trace.origin
    root.callbacks[:] = [o, o + 50_000_000]
    frames = ("recv_into @ site-packages/driver/net.py:10:5", "load @ app/views.py:7:3")
    trace.samples = [(1, o + 25_000_000, frames)]
    trace.finish(o + 50_000_000)
    (blocked,) = [f for f in analyze(trace).findings if f.kind == "blocked-loop"]
    assert blocked.stack == frames and blocked.site == frames[1]
    text = format_summary(analyze(trace))
    assert (
        "        at load @ app/views.py:7:3\n"
        "        in recv_into @ site-packages/driver/net.py:10:5" in text
    )
    # A sample outside the step's interval does not belong to it.
    trace.samples = [(1, o + 60_000_000, frames)]
    (blocked,) = [f for f in analyze(trace).findings if f.kind == "blocked-loop"]
    assert blocked.stack == ()


def test_the_watchdog_thread_sleeps_when_no_traced_request_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_watchdog, "_LINGER_NS", 50_000_000)
    _request(_sleeps_on_the_loop)
    thread = _watchdog._thread
    assert thread is not None and thread.is_alive() and thread.daemon
    assert not _watchdog._watched  # each trace is let go as its request ends
    deadline = time.monotonic() + 5
    while _watchdog._wake.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _watchdog._wake.is_set(), "the watchdog still looks with nothing to watch"
    assert _watchdog._on_gc not in gc.callbacks  # on only while it looks
    # and wakes for the next traced request
    assert _request(_sleeps_on_the_loop).samples
    assert _watchdog._on_gc in gc.callbacks
    assert sum(t.name == "asgi-asynctrace-watchdog" for t in threading.enumerate()) == 1


def test_a_failure_in_the_watchdog_is_counted_and_the_request_unharmed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(frame: Any, depth: int) -> tuple[str, ...]:
        raise RuntimeError("walk failed")

    monkeypatch.setattr(_watchdog, "frames_from", broken)
    trace = _request(_sleeps_on_the_loop)
    assert trace.samples is None and trace.root.state == "ok"
    assert failure_counts().get("watchdog", 0) >= 1
    monkeypatch.undo()
    assert _request(_sleeps_on_the_loop).samples  # and it goes on working


def test_analysis_settings_and_sampling_are_independent() -> None:
    # Samples are taken at the middleware's threshold; a stricter analysis still names them.
    trace = _request(_sleeps_on_the_loop, blocked_sample_ms=10)
    kinds = [f.kind for f in analyze(trace, AnalysisSettings(blocked_step_ms=50)).findings]
    assert "blocked-loop" in kinds


def test_joined_and_copied_traces_keep_their_samples() -> None:
    import copy
    import pickle

    from asgi_asynctrace import join_traces

    up = Trace.start(request={"method": "GET", "path": "/front"})
    fetch = up.add("fetch", 1, None, up.origin + 1_000)
    assert fetch is not None
    up.finish(up.origin + 90_000_000)
    parent = {"traceId": up.trace_id, "asyncId": fetch.async_id}
    down = Trace.start(request={"method": "GET", "path": "/back", "parent": parent})
    down.started_at_unix_ns = up.started_at_unix_ns + 5_000_000  # began 5 ms after the front
    frames = ("handler @ back/app.py:3:5",)
    down.samples = [(1, down.origin + 30_000_000, frames)]
    down.finish(down.origin + 60_000_000)
    (whole,) = join_traces([up, down])
    remote = next(r for r in whole.resources if r.type == "remote-root")
    assert whole.samples == [(remote.async_id, up.origin + 35_000_000, frames)]
    assert up.samples is None  # the traces joined are left as they were
    for twin in (copy.copy(down), pickle.loads(pickle.dumps(down))):
        assert twin.samples == down.samples


def _big_heap() -> list[Any]:
    """Enough objects that a full collection takes milliseconds."""
    return [[{} for _ in range(10)] for _ in range(30_000)]


@pytest.mark.gc_resources
def test_a_garbage_collection_in_a_traced_step_is_recorded_and_named() -> None:
    heap = _big_heap()

    async def collects() -> None:
        await asyncio.sleep(0)
        gc.collect()

    trace = _request(collects)
    del heap
    (collection,) = [r for r in trace.resources if r.type == "gc"]
    notes = trace.annotations_of(collection.async_id)
    assert notes["generation"] == 2 and isinstance(notes["collected"], int)
    assert collection.trigger_id == 1 and collection.state == "ok"
    (gc_start, gc_end) = collection.intervals()[0]
    assert gc_end is not None and gc_end - gc_start >= _watchdog.GC_MIN_NS
    (start, end) = trace.root.intervals()[1]
    assert end is not None and start <= gc_start < gc_end <= end  # inside the step it blocked
    assert collection.settled_at == gc_end
    (blocked,) = [f for f in analyze(trace, AnalysisSettings(blocked_step_ms=1)).findings
                  if f.kind == "blocked-loop"]  # fmt: skip
    assert "of it in garbage collection (generation 2)" in blocked.title
    assert collection.async_id in blocked.resources
    assert "gc.freeze()" in blocked.fix
    doc = orjson.loads(trace.to_json())
    assert load_trace(trace.to_json()).to_dict()["resources"] == doc["resources"]


@pytest.mark.gc_resources
def test_a_collection_another_requests_code_ran_is_not_this_requests() -> None:
    heap = _big_heap()

    async def main() -> Trace:
        async def elsewhere() -> None:  # untraced: made before the traced request
            await asyncio.sleep(0.005)
            gc.collect()

        other = asyncio.create_task(elsewhere())

        async def waits() -> None:
            await asyncio.sleep(0.03)

        trace = await _request_in_loop(waits)
        assert other.done()  # its collection ran while the traced request waited
        await other
        return trace

    trace = run(main())
    del heap
    assert not [r for r in trace.resources if r.type == "gc"]


@pytest.mark.skipif(bool(NO_EAGER_TASKS), reason=NO_EAGER_TASKS)
def test_an_eager_tasks_first_step_inside_its_creators_is_its_own_then_the_creators() -> None:
    async def main() -> Trace:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]

        async def eager() -> None:
            time.sleep(0.06)  # the eager task's first step, run inside create_task

        async def body() -> None:
            await asyncio.sleep(0)
            task = asyncio.create_task(eager())
            assert task.done()
            time.sleep(0.06)  # the root's own step again, after the task's

        return await _request_in_loop(body)

    trace = run(main())
    by_id = {r.async_id: r for r in trace.resources}
    kinds = [(by_id[rid].type, frames[0].split(" @ ")[0].rpartition(".")[2])
             for rid, _, frames in trace.samples or ()]  # fmt: skip
    assert ("task", "eager") in kinds and ("root", "body") in kinds, kinds
    # each sample where its own resource was running: the task's in its step, the root's after
    assert all(t == ("task" if name == "eager" else "root") for t, name in kinds), kinds
    assert trace._running is None


def test_the_response_headers_trace_carries_the_samples_taken_before_it_started() -> None:
    from asgi_asynctrace import decode_trace_header
    from tests.helpers import call

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await _sleeps_on_the_loop()  # before the response starts: in the header's trace
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = AsyncTraceMiddleware(app, log_traces=False)
    response = call(middleware, lambda c: c.get("/", headers={"X-Async-Trace": "1"}))
    doc = decode_trace_header(response.headers["x-async-trace-data"])
    assert isinstance(doc, dict)
    line = _line(_sleeps_on_the_loop, "time.sleep(0.1)")
    assert doc["samples"], doc.get("samples")
    assert all(s["frames"][0].startswith(f"_sleeps_on_the_loop @ {HERE}:{line}:")
               for s in doc["samples"])  # fmt: skip
    assert load_trace(doc).samples


# -- the thread's sleep without the GIL (quiet_wait, in the C accelerator) -------------------
try:
    from asgi_asynctrace._speedups import quiet_poke, quiet_wait
except ImportError:  # no accelerator, or one built without atomics: the thread polls
    quiet_poke = quiet_wait = None  # type: ignore[assignment]
_C_WAIT = pytest.mark.skipif(quiet_wait is None, reason="quiet_wait is not built (no accelerator)")


def _wait_in_a_thread(pause_ms: int, after_ms: int, limit_ms: int) -> tuple[list[Any], Any]:
    """``quiet_wait`` in a thread of its own, started now; [(what it returned, when)] once it
    has, and the thread."""
    wait, pokes = quiet_wait, quiet_poke(False)
    got: list[Any] = []

    def waits() -> None:
        returned = wait(pause_ms * 1_000_000, after_ms * 1_000_000, limit_ms * 1_000_000, pokes)
        got.append((returned, time.perf_counter()))

    thread = threading.Thread(target=waits)
    thread.start()
    return got, thread


async def _short_steps() -> None:
    """400 ms of traced steps of 0.2 ms each: a busy loop that never blocks."""
    end = time.perf_counter() + 0.4
    while time.perf_counter() < end:
        _spin(0.0002)
        await asyncio.sleep(0)


@_C_WAIT
def test_the_watchdog_sleeps_through_a_busy_loop_of_short_steps() -> None:
    start = time.perf_counter()
    # (pause = after: should the thread start only once a step runs, on a loaded machine, that
    # step counts as due when it has run as long as any other)
    got, thread = _wait_in_a_thread(100, 100, 300)
    _request(_short_steps, blocked_sample_ms=None)
    thread.join()
    [(returned, at)] = got
    assert returned is False and at - start >= 0.3  # no step ran 100 ms: slept to its limit


@_C_WAIT
def test_the_watchdog_wakes_for_a_long_step_while_it_runs() -> None:
    when: dict[str, float] = {}

    async def blocks() -> None:
        await asyncio.sleep(0)
        when["start"] = time.perf_counter()
        time.sleep(0.2)  # lets go of the GIL, as a blocking driver call does
        when["end"] = time.perf_counter()

    got, thread = _wait_in_a_thread(30, 30, 2000)  # (pause = after: as above)
    _request(blocks, blocked_sample_ms=None)
    thread.join()
    [(returned, at)] = got
    assert returned is True
    assert when["start"] + 0.03 <= at < when["end"]  # 30 ms into the step, before it ended


@_C_WAIT
def test_the_watchdog_sleeps_when_no_traced_step_runs() -> None:
    # after traced requests of every kind have come and gone (a step's mark always taken off),
    # a wait for 1 ms steps sleeps to its limit
    _request(_sleeps_on_the_loop, blocked_sample_ms=None)
    _request(_short_steps, blocked_sample_ms=None)
    start = time.perf_counter()
    got, thread = _wait_in_a_thread(1, 1, 60)
    thread.join()
    [(returned, at)] = got
    assert returned is False and at - start >= 0.06


@_C_WAIT
def test_a_poke_ends_the_wait() -> None:
    start = time.perf_counter()
    got, thread = _wait_in_a_thread(1, 10_000, 10_000)
    time.sleep(0.05)
    quiet_poke(True)
    thread.join(5)
    [(returned, at)] = got
    assert returned is False and at - start < 2


@_C_WAIT
def test_the_watchdog_takes_the_gil_only_to_look_at_a_long_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    looks: list[int] = []
    look = _watchdog._look

    def counted(now: int) -> tuple[int, int]:
        looks.append(now)
        return look(now)

    monkeypatch.setattr(_watchdog, "_look", counted)
    # 400 ms of short steps, sampled from 100 ms: the thread looked every 20 ms before (20
    # times, taking the GIL from the loop each time); now once as it starts, or not at all
    trace = _request(_short_steps, blocked_sample_ms=100)
    assert trace.samples is None
    assert len(looks) <= 2, len(looks)
    # and a trace watched with a lower threshold than the wait's has its long step sampled
    assert _request(_sleeps_on_the_loop, blocked_sample_ms=5).samples


def _voluntary_switches() -> int:
    """How often this thread has given up its processor (slept, waited) so far."""
    with open("/proc/thread-self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))


_PROC = pytest.mark.skipif(
    not os.path.exists("/proc/thread-self/status"), reason="counts switches in Linux's /proc"
)


@_C_WAIT
@_PROC
def test_a_quiet_wait_looks_when_a_step_could_be_due_not_four_times_as_often() -> None:
    # no traced step runs for 400 ms: a look every 20 ms (after_ns), 20 in all; it looked
    # every 5 ms until the nineteenth session (80), each a switch of a processor to it
    got: list[int] = []

    def waits() -> None:
        before = _voluntary_switches()
        quiet_wait(20_000_000, 20_000_000, 400_000_000, quiet_poke(False))
        got.append(_voluntary_switches() - before)

    thread = threading.Thread(target=waits)
    thread.start()
    thread.join()
    assert 5 <= got[0] <= 30, got  # (fewer than 20 when the machine wakes it late)


@_C_WAIT
def test_a_steady_trickle_of_traced_requests_never_hands_the_watchdog_the_gil(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each time the thread's wait returns it takes the GIL, which a busy loop hands over
    # badly (70-330 ms of futile wake-ups, measured). Its wait returned at its limit, every
    # second, to see whether to fall asleep: now only once no traced step ran for a second.
    waits: list[bool] = []
    wait = quiet_wait

    def counted(*args: int) -> bool:
        due = bool(wait(*args))
        waits.append(due)
        return due

    async def short() -> None:
        await asyncio.sleep(0)

    async def trickle() -> None:
        await _request_in_loop(short)  # the thread is awake from here
        monkeypatch.setattr(_watchdog, "_quiet_wait", counted)
        end = time.perf_counter() + 2.5
        while time.perf_counter() < end:
            await _request_in_loop(short)  # a traced request every 5 ms or so
            _spin(0.005)  # untraced work on the loop between them
            await asyncio.sleep(0)

    run(trickle())
    # (a return for a step that ran long, as when the machine stalls the process, is due)
    assert waits.count(False) <= 1, waits
