"""Who held the loop: a request kept waiting by another's blocking step is told which one, by
the store's analysis, the summary and the viewer's link to that request's trace."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AsyncTraceMiddleware, Trace, analyze, load_trace
from asgi_asynctrace._blockers import name_blockers
from asgi_asynctrace._report import format_summary
from tests.helpers import call

ON = {"X-Async-Trace": "1"}
BLOCKING_LINE = 0  # set below: the line of the blocking call


def blocking_app(**settings: Any) -> AsyncTraceMiddleware:
    """``/wait`` sleeps 5 ms; ``/block`` waits until /wait has begun its sleep, then blocks
    the loop 100 ms: /wait's sleep ends ~95 ms late, whatever the machine's speed, and
    whichever of the two reached the app first (/wait waits for /block to arrive)."""
    arrived, started = asyncio.Event(), asyncio.Event()

    async def wait(request: Request) -> Response:
        await arrived.wait()
        started.set()
        await asyncio.sleep(0.005)
        return PlainTextResponse("waited")

    async def block(request: Request) -> Response:
        arrived.set()
        await started.wait()
        arrived.clear()
        started.clear()
        time.sleep(0.1)  # the blocking call
        return PlainTextResponse("blocked")

    global BLOCKING_LINE
    BLOCKING_LINE = block.__code__.co_firstlineno + 5
    app = Starlette(routes=[Route("/wait", wait), Route("/block", block)])
    return AsyncTraceMiddleware(app, log_traces=False, **settings)


async def _both(c: httpx.AsyncClient) -> tuple[str, str, Any]:
    blocked, waited = await asyncio.gather(c.get("/block", headers=ON), c.get("/wait", headers=ON))
    wait_id = waited.headers["x-async-trace-id"]
    got = await c.get(f"/__asynctrace/traces/{wait_id}?analysis=1")
    return blocked.headers["x-async-trace-id"], wait_id, got.json()


def test_the_store_names_the_request_whose_step_held_the_loop() -> None:
    block_id, wait_id, doc = call(blocking_app(), _both)
    (busy,) = [f for f in doc["analysis"]["findings"] if f["kind"] == "loop-busy"]
    (blocker,) = busy["blockers"]
    assert blocker["traceId"] == block_id and blocker["request"] == "GET /block"
    assert blocker["label"] == "GET /block"  # its own code, not a task of its
    assert 90e6 <= blocker["ranNs"] <= 400e6 and blocker["coveredNs"] >= 80e6
    # where the watchdog saw it blocked: the line of the blocking call (the function's
    # qualified name from Python 3.11, its name before)
    where = f"block @ tests/test_blockers.py:{BLOCKING_LINE}:"
    assert where in blocker["site"], blocker["site"]
    ((start, end),) = busy["windowsNs"]
    assert 80e6 <= end - start <= 400e6
    assert doc["trace"]["traceId"] == wait_id  # beside the waiting request's own trace


def _stored_pair() -> tuple[Trace, Trace]:
    """The traces of /wait and of /block that held it up, as the app's store keeps them."""
    app = blocking_app()
    block_id, wait_id, _ = call(app, _both)
    assert app.store is not None
    waited, blocked = app.store.trace(wait_id), app.store.trace(block_id)
    assert isinstance(waited, Trace) and isinstance(blocked, Trace)
    return waited, blocked


def test_the_summary_says_who_held_the_loop() -> None:
    waited, blocked = _stored_pair()
    block_id = blocked.trace_id
    named = name_blockers(analyze(waited), waited, [blocked, waited])
    text = format_summary(named)
    assert "held by GET /block: ran " in text and f"(trace {block_id})" in text
    assert f"tests/test_blockers.py:{BLOCKING_LINE}:" in text.split("held by", 1)[1]
    # the same from a trace read back from its JSON (as the store does once it was read)
    again = name_blockers(analyze(waited), waited, [load_trace(blocked.to_json())])
    assert [b.trace_id for f in again.findings for b in f.blockers] == [block_id]


def test_steps_outside_the_wait_and_the_trace_itself_are_not_named() -> None:
    waited, blocked = _stored_pair()
    analysis = analyze(waited)
    assert name_blockers(analysis, waited, [waited]).findings == analysis.findings
    # a trace that ran at another time (its clock moved a second later) held nothing up
    blocked.started_at_unix_ns += 1_000_000_000
    assert all(not f.blockers for f in name_blockers(analysis, waited, [blocked]).findings)


def test_the_cli_trace_command_prints_who_held_the_loop(capsys: Any) -> None:
    import threading

    from asgi_asynctrace._cli import main
    from tests.servers import serving

    with serving(blocking_app()) as base:
        blocked: list[httpx.Response] = []
        other = threading.Thread(
            target=lambda: blocked.append(httpx.get(f"{base}/block", headers=ON))
        )
        other.start()  # it waits for /wait to begin, then blocks the loop
        assert main(["trace", f"{base}/wait"]) == 0
        other.join()
        out = capsys.readouterr().out
    assert "] loop-busy: timer sleep 5.0ms was ready " in out
    block_id = blocked[0].headers["x-async-trace-id"]
    assert "held by GET /block: ran " in out and f"(trace {block_id})" in out


def test_trace_n_says_which_requests_held_the_slowest_one_up(capsys: Any) -> None:
    from asgi_asynctrace._cli import main
    from tests.servers import serving

    async def hold(request: Request) -> Response:
        await asyncio.sleep(0.02)  # long enough for the other two to arrive
        time.sleep(0.1)  # then each holds the loop in turn
        return PlainTextResponse("held")

    app = AsyncTraceMiddleware(Starlette(routes=[Route("/hold", hold)]), log_traces=False)
    with serving(app) as base:
        assert main(["trace", "-n", "3", "-c", "3", f"{base}/hold"]) == 0
    out = capsys.readouterr().out
    said = out.split("the slowest waited for the loop while other requests held it:\n", 1)
    assert len(said) == 2, out
    held = [line for line in said[1].splitlines() if line.startswith("  GET /hold: ran ")]
    line = hold.__code__.co_firstlineno + 2
    assert held and all(f"hold @ tests/test_blockers.py:{line}:" in h for h in held), said[1]
