"""Creation stacks: captured by walking frames, formatted once per code location.

    stack = capture(max_depth=16)
    stack.frames[0]     # "load_items @ app/routes.py:42:11" (innermost first)

Walking frames reads no source files (``traceback.extract_stack`` does); the formatted frames are
cached by the (code, instruction) pairs of the walk, so a repeated call site costs the walk and
one dict lookup. The walk is done by the optional C accelerator (``_speedups``) when it was built,
in Python otherwise: same keys' meaning, same stacks.
Exports: Stack, capture, format_frame, frames_from, pass_through, stop_at.
"""

from __future__ import annotations

import asyncio.events
import asyncio.runners
import inspect
import os
import sys
import sysconfig
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Final

_c_lookup: Callable[..., object] | None
try:
    from ._speedups import stack_lookup as _c_lookup
except ImportError:  # built without a compiler: the pure-Python walk below
    _c_lookup = None
#: Whether creation stacks are walked by the C accelerator.
ACCELERATED: Final = _c_lookup is not None

__all__ = [
    "ACCELERATED",
    "Stack",
    "capture",
    "capture_python",
    "format_frame",
    "frames_from",
    "pass_through",
    "stop_at",
]

_PACKAGE_DIR: Final = os.path.dirname(os.path.abspath(__file__)) + os.sep
# The instrumentation package lives beside us once installed, or in the source tree's
# top-level instrumentation/ folder during an editable install.
_OWN_DIRS: Final = (
    _PACKAGE_DIR,
    os.path.join(os.path.dirname(os.path.dirname(_PACKAGE_DIR)), "instrumentation") + os.sep,
)
_STDLIB_DIRS: Final = tuple(
    {os.path.realpath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")}
)
# A frame of the loop running a callback: everything outside it is the loop, not the request.
_STOP_CODE: Final = asyncio.events.Handle._run.__code__
# A loop whose callbacks run in C (uvloop) leaves no such frame. There a walk stops where a
# coroutine's frame was entered from a plain function's: that coroutine is being driven by
# whoever runs the loop (asyncio.Runner.run, uvloop.run, a server's main), and from that plain
# function outwards the frames are the process's, not the request's. A callback's walk stops
# at asyncio's runners (what asyncio.run, uvloop.run and uvicorn run the loop from on 3.11+;
# asyncio.run itself on 3.10). _speedups.c's walk does the same (frame_kind).
_runner = getattr(asyncio.runners, "Runner", None)
_RUNNER_CODES: Final = (
    asyncio.runners.run.__code__,
    (_runner.run.__code__ if _runner is not None else asyncio.runners.run.__code__),
)
_CORO_FLAGS: Final = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE
_RESUMABLE_FLAGS: Final = (
    inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE
) | inspect.CO_ASYNC_GENERATOR
# Plain functions that drive a coroutine for the tracer itself (pass_through): walked past,
# standing for the coroutine they drive. Compared by identity (a code object's hash and
# equality read its contents).
_drivers: tuple[CodeType, ...] = ()
# Where a request begins (stop_at): the middleware's coroutine that runs the app. From it
# outwards the frames are the server's (uvicorn's run_asgi, an outer middleware), the same for
# every request, and a walk stops there, coroutine though it is.
_boundaries: tuple[CodeType, ...] = ()
_boundary_ids: frozenset[int] = frozenset()  # their ids (_boundaries keeps them alive)
_STOPS: Final = -1


def _frame_kind(code: CodeType, inner_coro: int) -> int:
    """What a walk does at a frame running ``code``, given whether the frame just inside it
    is a coroutine (or stands for one): ``_STOPS`` before it, or goes on, returning whether
    this frame is a coroutine or stands for one."""
    flags = code.co_flags
    if flags & _RESUMABLE_FLAGS:
        return _STOPS if id(code) in _boundary_ids else flags & _CORO_FLAGS
    if code is _STOP_CODE:
        return _STOPS
    for d in _drivers:
        if code is d:
            return 1
    if inner_coro or code is _RUNNER_CODES[0] or code is _RUNNER_CODES[1]:
        return _STOPS
    return 0


_MAX_CACHE: Final = 8192

# (code id, instruction) pairs -> Stack. The Stack keeps those code objects alive, so an id
# in a key can never be reused by another code object while the entry exists.
_cache: dict[object, Stack] = {}
# The C walk's cache: hash of the walk -> (the walk packed as bytes, its Stack). C compares
# the packed walk in full on every hit, so the hash only finds the entry.
_c_cache: dict[int, tuple[bytes, Stack]] = {}
_path_cache: dict[str, str | None] = {}
# (id(code), last instruction) -> (code, its frame as text, or None for the tracer's own):
# stacks missed for the first time share most of their frames with stacks already made.
_frame_cache: dict[tuple[int, int], tuple[CodeType, str | None]] = {}
_MAX_FRAME_CACHE: Final = 65536
_cwd = os.getcwd() + os.sep


class Stack:
    """One formatted stack. Hashed by identity: the cache hands out one per call site, so a
    trace interns it with a pointer comparison instead of hashing its frames."""

    __slots__ = ("codes", "frames")

    def __init__(self, frames: tuple[str, ...], codes: tuple[CodeType, ...]) -> None:
        self.frames = frames
        self.codes = codes  # keeps the code objects, hence the ids in the cache key, alive


def pass_through(*codes: CodeType) -> None:
    """Have every walk go on past frames running ``codes`` (plain functions that drive a
    coroutine for the tracer, such as the pure-Python TimedCoroutine's ``send``) into the
    coroutine's awaiter, as it does past the C TimedCoroutine, which has no frame. The codes
    given replace those given before (at most four)."""
    global _drivers
    _drivers = codes
    _set_bounds()


def stop_at(*codes: CodeType) -> None:
    """Have every walk stop at frames running ``codes``: where a request begins (the
    middleware's coroutine that runs the app), outside which the frames are the server's. The
    codes given replace those given before (at most four)."""
    global _boundaries, _boundary_ids
    _boundaries = codes
    _boundary_ids = frozenset(map(id, codes))
    _set_bounds()


def _set_bounds() -> None:
    if _c_lookup is not None:
        from ._speedups import set_stack_bounds

        set_stack_bounds(_drivers, _RUNNER_CODES, _boundaries)


def capture(max_depth: int, skip: int = 1) -> Stack:
    """The caller's stack, innermost frame first."""
    if _c_lookup is not None:
        got = _c_lookup(skip, max_depth, _STOP_CODE, _c_cache)
        if type(got) is Stack:
            return got
        return _format_and_cache_c(got, skip + 1)  # type: ignore[arg-type]
    return capture_python(max_depth, skip + 1)


def capture_python(max_depth: int, skip: int = 1) -> Stack:
    """``capture()`` without the C accelerator (used when it is not built, and in tests)."""
    f: FrameType | None = sys._getframe(skip)
    key: list[int] = []
    append = key.append
    n = 0
    coro = 0
    while f is not None and n < max_depth:
        code = f.f_code
        flags = code.co_flags
        if flags & _RESUMABLE_FLAGS:  # most of a request's frames: no call to classify them
            if id(code) in _boundary_ids:
                break
            coro = flags & _CORO_FLAGS
        else:
            coro = _frame_kind(code, coro)
            if coro == _STOPS:
                break
        append(id(code))
        append(f.f_lasti)
        f = f.f_back
        n += 1
    k = tuple(key)
    hit = _cache.get(k)
    if hit is not None:
        return hit
    return _format_and_cache(k, skip + 1, n)


def _format_and_cache_c(miss: tuple[int, bytes], skip: int) -> Stack:
    h, packed = miss
    stack = _format(skip + 1, len(packed) // 16)
    if len(_c_cache) >= _MAX_CACHE:
        _c_cache.clear()
    _c_cache[h] = (packed, stack)
    return stack


def _format_and_cache(key: object, skip: int, n: int) -> Stack:
    stack = _format(skip + 1, n)
    if len(_cache) >= _MAX_CACHE:
        _cache.clear()
    _cache[key] = stack
    return stack


def _format(skip: int, n: int) -> Stack:
    f: FrameType | None = sys._getframe(skip)
    frames: list[str] = []
    codes: list[CodeType] = []
    for _ in range(n):
        if f is None:
            break
        code = f.f_code
        codes.append(code)
        text = _frame_text(f, code)
        if text is not None:
            frames.append(text)
        f = f.f_back
    return Stack(tuple(frames), tuple(codes))


def _frame_text(f: FrameType, code: CodeType) -> str | None:
    """One frame as text, None for the tracer's own (cached by code and instruction)."""
    key = (id(code), f.f_lasti)
    known = _frame_cache.get(key)
    if known is None or known[0] is not code:
        path = _display_path(code.co_filename)
        text = format_frame(code, f.f_lasti, f.f_lineno, path) if path is not None else None
        if len(_frame_cache) >= _MAX_FRAME_CACHE:
            _frame_cache.clear()
        known = _frame_cache[key] = (code, text)
    return known[1]


def frames_from(frame: FrameType | None, max_depth: int) -> tuple[str, ...]:
    """The frames from ``frame`` (another thread's, for the blocked-loop watchdog) outwards,
    innermost first, as ``capture()`` formats them: up to the loop's callback runner, the
    tracer's own frames left out. Each frame's text comes from the cache creation stacks use;
    the walk itself is not cached, since a sample is rare."""
    frames: list[str] = []
    n = 0
    coro = 0
    while frame is not None and n < max_depth:
        code = frame.f_code
        coro = _frame_kind(code, coro)
        if coro == _STOPS:
            break
        text = _frame_text(frame, code)
        if text is not None:
            frames.append(text)
        frame = frame.f_back
        n += 1
    return tuple(frames)


if _c_lookup is not None:  # what TraceCore.new_resource formats a missed walk with
    from ._speedups import set_stack_formatter

    set_stack_formatter(_format_and_cache_c, _c_cache, _STOP_CODE)
    pass_through()


def format_frame(code: CodeType, lasti: int, lineno: int | None, path: str) -> str:
    """``function @ path:line:column`` (column 1-based; 0 where Python cannot tell)."""
    name = getattr(code, "co_qualname", code.co_name)
    line = lineno or code.co_firstlineno
    column = 0
    positions = getattr(code, "co_positions", None)
    if positions is not None and lasti >= 0:
        for i, pos in enumerate(positions()):
            if i == lasti // 2:
                if pos[0] is not None:
                    line = pos[0]
                column = (pos[2] or 0) + 1 if pos[2] is not None else 0
                break
    return f"{name} @ {path}:{line}:{column}"


def _display_path(filename: str) -> str | None:
    """The path shown for a file, or None for the tracer's own files (left out of stacks)."""
    cached = _path_cache.get(filename, "")
    if cached != "":
        return cached
    shown: str | None
    full = os.path.realpath(filename) if not filename.startswith("<") else filename
    if full.startswith(_OWN_DIRS):
        shown = None
    elif "site-packages" + os.sep in full or "dist-packages" + os.sep in full:
        marker = "site-packages" if "site-packages" + os.sep in full else "dist-packages"
        shown = "site-packages/" + full.rsplit(marker + os.sep, 1)[1].replace(os.sep, "/")
    elif full.startswith(_STDLIB_DIRS):
        rest = next(full[len(d) :] for d in _STDLIB_DIRS if full.startswith(d))
        shown = "<stdlib>/" + rest.replace(os.sep, "/")
    elif full.startswith(_cwd):
        shown = full[len(_cwd) :].replace(os.sep, "/")
    else:
        shown = full.replace(os.sep, "/")
    _path_cache[filename] = shown
    return shown
