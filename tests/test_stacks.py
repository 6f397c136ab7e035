from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Generator
from typing import Any

import pytest

from asgi_asynctrace import _stacks
from asgi_asynctrace._stacks import capture
from tests.helpers import run_on_uvloop


def _here() -> tuple[object, tuple[str, ...]]:
    stack = capture(8, skip=1)
    return stack, stack.frames


def test_frames_read_function_path_line_column_with_paths_relative_to_the_cwd() -> None:
    _, frames = _here()
    assert frames[0].startswith("_here @ tests/test_stacks.py:")
    line, column = frames[0].rsplit(":", 2)[1:]
    assert int(line) == _here.__code__.co_firstlineno + 1
    # where "capture(" starts on that line, 1-based; Python 3.10 cannot tell columns
    assert int(column) == (13 if sys.version_info >= (3, 11) else 0)
    assert frames[1].startswith("test_frames_read_function_path_line_column")


def test_a_repeated_call_site_is_served_from_the_cache() -> None:
    results = [_here() for _ in range(3)]
    keys = {r[0] for r in results}
    assert len(keys) == 1
    assert results[0][1] is results[1][1] is results[2][1]


def test_different_call_sites_get_different_stacks() -> None:
    a = _here()
    b = _here()
    assert a[0] != b[0]
    assert a[1][1] != b[1][1]


def test_the_tracers_own_frames_are_left_out() -> None:
    frames = asyncio.run(_stack_in_a_task())
    assert frames
    assert not any("asgi_asynctrace/" in f for f in frames)


async def _stack_in_a_task() -> tuple[str, ...]:
    from asgi_asynctrace import Trace
    from asgi_asynctrace._context import ACTIVE, new_resource

    trace = Trace.start()
    ACTIVE.set((trace, trace.root))
    res = new_resource("task", trace, trace.root, skip=1)
    assert res is not None and res.stack_id is not None
    return trace.stacks[res.stack_id]


def test_the_walk_stops_at_the_event_loop_and_at_the_depth_cap() -> None:
    async def inner() -> tuple[str, ...]:
        return capture(64, skip=1).frames

    frames = asyncio.run(inner())
    assert len(frames) == 1 and frames[0].split(" @ ")[0].endswith("inner")
    assert len(capture(2, skip=1).frames) == 2


def _uvloop_run(main: Any) -> Any:
    pytest.importorskip("uvloop")
    return run_on_uvloop(main)


@pytest.mark.parametrize("walk", ["c", "python"])
def test_on_uvloop_a_tasks_walk_stops_at_its_coroutine_not_at_the_process_outside_it(
    walk: str,
) -> None:
    # uvloop runs a task's step from C: no Handle._run frame to stop at. The walk stops where
    # the task's outermost coroutine was entered from a plain function (asyncio.Runner.run
    # here), as it does at Handle._run on asyncio's own loop; the coroutines awaited in the
    # task, and a plain function called in one, are all kept.
    take = capture if walk == "c" else _stacks.capture_python

    def helper() -> tuple[str, ...]:
        return take(64, skip=1).frames

    async def awaited() -> tuple[str, ...]:
        return helper()

    async def task() -> tuple[str, ...]:
        return await awaited()

    async def main() -> tuple[tuple[str, ...], tuple[str, ...]]:
        return await asyncio.create_task(task()), await task()

    in_task, in_main = _uvloop_run(main())
    assert [f.split(" @ ")[0].rsplit(".", 1)[-1] for f in in_task] == ["helper", "awaited", "task"]
    names = [f.split(" @ ")[0].rsplit(".", 1)[-1] for f in in_main[:4]]
    assert names == ["helper", "awaited", "task", "main"]
    # on 3.11+ uvloop.run's own wrapper coroutine runs main(): the walk ends in it
    assert [f.split(" @ ")[1].split("/")[1] for f in in_main[4:]] in ([], ["uvloop"])


@pytest.mark.parametrize("walk", ["c", "python"])
def test_on_uvloop_a_callbacks_walk_stops_at_the_loops_runner(walk: str) -> None:
    take = capture if walk == "c" else _stacks.capture_python

    async def main() -> tuple[str, ...]:
        got: asyncio.Future[tuple[str, ...]] = asyncio.get_running_loop().create_future()

        def callback() -> None:
            got.set_result(take(64, skip=1).frames)

        asyncio.get_running_loop().call_soon(callback)
        return await got

    frames = _uvloop_run(main())
    assert [f.split(" @ ")[0].rsplit(".", 1)[-1] for f in frames] == ["callback"]


@pytest.mark.parametrize("walk", ["c", "python"])
def test_a_coroutine_driven_through_a_plain_generator_keeps_its_awaiters_frames(
    walk: str,
) -> None:
    # Only a plain function outside a coroutine ends a walk: an __await__ that is a plain
    # generator delegating to a coroutine (yield from) is walked through.
    take = capture if walk == "c" else _stacks.capture_python

    async def deep() -> tuple[str, ...]:
        return take(64, skip=1).frames

    class Delegating:
        def __await__(self) -> Generator[Any, None, tuple[str, ...]]:
            return (yield from deep().__await__())

    async def outer() -> tuple[str, ...]:
        return await Delegating()

    frames = asyncio.run(outer())
    names = [f.split(" @ ")[0].rsplit(".", 1)[-1] for f in frames]
    assert names == ["deep", "__await__", "outer"]


@pytest.mark.parametrize("walk", ["c", "python"])
def test_a_coroutine_sent_to_by_hand_ends_its_walk_at_the_sender(walk: str) -> None:
    take = capture if walk == "c" else _stacks.capture_python

    async def coro() -> tuple[str, ...]:
        return take(64, skip=1).frames

    def driver() -> tuple[str, ...]:
        try:
            coro().send(None)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        raise AssertionError("did not finish")

    assert [f.split(" @ ")[0].rsplit(".", 1)[-1] for f in driver()] == ["coro"]


def test_a_requests_stacks_stop_where_the_middleware_runs_the_app() -> None:
    """What called the middleware (a server's run_asgi, an outer middleware; here the test's
    helper) is the same for every request: a creation stack ends at the middleware."""
    from tests.helpers import traced

    async def handler() -> None:
        await asyncio.sleep(0.001)

    trace = traced(handler)
    (timer,) = [r for r in trace.resources if r.type == "timer"]
    assert timer.stack_id is not None
    names = [f.split(" @ ")[0].rsplit(".", 1)[-1] for f in trace.stacks[timer.stack_id]]
    assert names == ["sleep", "handler", "app"]  # the helper's app; not the helper, nor run()


def test_library_paths_are_spelled_so_their_origin_shows() -> None:
    assert _stacks._display_path(asyncio.__file__) == "<stdlib>/asyncio/__init__.py"
    import httpx

    assert _stacks._display_path(httpx.__file__) == "site-packages/httpx/__init__.py"
    assert _stacks._display_path(_stacks.__file__) is None


HAS_COMPILER = shutil.which("cc") is not None or shutil.which("gcc") is not None


@pytest.mark.skipif(not HAS_COMPILER, reason="no C compiler here: the pure-Python paths run")
@pytest.mark.skipif(
    bool(os.environ.get("ASYNCTRACE_PURE_PYTHON")), reason="the accelerator is turned off"
)
def test_the_c_accelerator_is_built_where_a_compiler_is() -> None:
    # a silent fallback would hide a broken build behind slower stacks
    assert _stacks.ACCELERATED


def _both_walks(depth: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return capture(depth, skip=1).frames, _stacks.capture_python(depth, skip=1).frames


def test_the_c_walk_and_the_python_walk_give_the_same_stacks() -> None:
    async def nested(k: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if k:
            return await nested(k - 1)
        return _both_walks(16)

    c_frames, py_frames = asyncio.run(nested(3))
    assert [f.rsplit(":", 2)[0] for f in c_frames] == [f.rsplit(":", 2)[0] for f in py_frames]
    assert len(c_frames) == 5  # _both_walks and four nested() frames, up to the loop
    for depth in (1, 2, 7):
        c_frames, py_frames = _both_walks(depth)
        assert len(c_frames) == len(py_frames) == depth


def test_the_c_walk_keys_a_call_site_by_position_not_just_by_function() -> None:
    a = capture(8, skip=1)
    b = capture(8, skip=1)
    again = [capture(8, skip=1) for _ in range(2)]
    assert a is not b
    assert again[0] is again[1]


def _deep(k: int) -> tuple[int, int]:
    """Two captures from the same place k plain calls deep: the GC-tracked objects each made."""
    if k:
        return _deep(k - 1)
    import gc

    made = []
    gc.disable()
    try:
        for _ in range(2):  # one call site: a miss, then a hit
            before = gc.get_count()[0]
            capture(16, skip=1)
            made.append(gc.get_count()[0] - before)
    finally:
        gc.enable()
    return made[0], made[1]


@pytest.mark.skipif(not _stacks.ACCELERATED, reason="the C walk is not built")
@pytest.mark.skipif(
    not (3, 11) <= sys.version_info[:2] <= (3, 13), reason="reads CPython 3.11-3.13's frames"
)
def test_a_cached_stack_costs_no_garbage_collected_allocation() -> None:
    # The public walk (PyFrame_GetBack) made a frame object for every frame it passed, each
    # a collectable object for the GC to count and walk; the C walk reads the frames as they
    # are, and a hit builds no key object the collector sees.
    first, again = _deep(12)
    assert first > 0  # a miss formats the stack: tuples, strings
    assert again == 0


@pytest.mark.skipif(not _stacks.ACCELERATED, reason="the C walk is not built")
def test_the_c_lookup_compares_the_whole_walk_not_only_its_hash() -> None:
    from asgi_asynctrace._speedups import stack_lookup

    def look(cache: dict[int, tuple[bytes, object]]) -> object:
        return stack_lookup(0, 8, _stacks._STOP_CODE, cache)

    cache: dict[int, tuple[bytes, object]] = {}
    found = object()
    got: list[object] = []
    h, packed = 0, b""
    for step in range(3):  # one call site, so one walk
        got.append(look(cache))
        if step == 0:
            assert isinstance(got[0], tuple)
            h, packed = got[0]
            cache[h] = (packed, found)
        elif step == 1:
            cache[h] = (packed[:-1] + bytes([packed[-1] ^ 1]), found)  # same hash, other walk
    assert len(packed) % 16 == 0 and len(packed) // 16 >= 2  # look() and this test at least
    assert got[1] is found
    assert got[2] == (h, packed)
    with pytest.raises(TypeError):
        stack_lookup(0, 8, None, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        stack_lookup(-1, 8, None, {})


@pytest.mark.skipif(not _stacks.ACCELERATED, reason="the C walk is not built")
def test_a_walk_found_before_is_not_taken_from_a_cache_changed_or_replaced_since() -> None:
    # The C lookup remembers the walks it found last, in front of the dict: an entry must not
    # outlive a change to the dict it came from, nor answer for another dict.
    from asgi_asynctrace._speedups import stack_lookup

    cache: dict[int, tuple[bytes, object]] = {}
    other: dict[int, tuple[bytes, object]] = {}
    found, replaced = object(), object()
    h, packed = 0, b""
    got: list[object] = []
    # every lookup from this one call site, so all of them walk the same frames
    for step, where in enumerate([cache, cache, cache, cache, other, cache, cache]):
        got.append(stack_lookup(0, 8, _stacks._STOP_CODE, where))
        if step == 0:  # a miss: the caller formats and stores it
            assert isinstance(got[0], tuple)
            h, packed = got[0]
            cache[h] = (packed, found)
        elif step == 2:  # found twice (the second from the front): another walk is added
            cache[h + 1] = (b"", object())
        elif step == 4:  # asked of another dict
            cache.clear()
        elif step == 5:
            cache[h] = (packed, replaced)
    assert got[1:4] == [found, found, found]
    assert got[4] == (h, packed)  # the other dict's own answer, not the remembered one
    assert got[5] == (h, packed)  # cleared: not found any more
    assert got[6] is replaced


def test_a_new_stack_takes_frames_it_shares_with_known_ones_from_the_frame_cache() -> None:
    def inner() -> _stacks.Stack:
        return capture(16)

    def outer_a() -> _stacks.Stack:
        return inner()

    def outer_b() -> _stacks.Stack:
        return inner()

    _stacks._c_cache.clear()
    _stacks._cache.clear()
    _stacks._frame_cache.clear()
    a = outer_a()
    code = inner.__code__
    (key,) = [k for k, v in _stacks._frame_cache.items() if v[0] is code]
    # an entry left under the same key by another code object (its id reused) is not taken
    forged: dict[tuple[int, int], tuple[object, str | None]] = {key: (outer_a.__code__, "forged")}
    _stacks._frame_cache.update(forged)  # type: ignore[arg-type]
    b = outer_b()
    assert a.frames[0] == b.frames[0] and "inner @ tests/test_stacks.py:" in a.frames[0]
    assert "outer_a @" in a.frames[1] and "outer_b @" in b.frames[1]
    assert "forged" not in b.frames
    assert _stacks._frame_cache[key] == (code, a.frames[0])
