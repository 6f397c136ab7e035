"""Who gets a trace: the flag header in any value or shape, the secret, sampling and its
budget, the C and the Python checks of a scope, and a trace opened in C."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse

from asgi_asynctrace import (
    AsyncTraceMiddleware,
    Trace,
    _request,
    capture_traces,
    failure_counts,
)
from tests.helpers import call, run
from tests.middleware_app import ON, get_page, routes, traced_app


@pytest.mark.parametrize(
    "value",
    ["", "0", "off", "x" * 5000, "caf\u00e9", "\x00\x01", "1, 1", " true "],
)
def test_odd_header_values_never_cause_an_error(value: str) -> None:
    app = traced_app()
    headers = [(b"x-async-trace", value.encode("utf-8"))]

    async def go(c: httpx.AsyncClient) -> httpx.Response:
        return await c.get("/hello", headers=headers)

    r = call(app, go)
    assert r.status_code == 200 and r.text == "hello"
    traced = "x-async-trace-id" in r.headers
    assert traced == (value in ("1, 1", " true "))


def test_with_a_secret_only_the_secret_turns_tracing_on_from_any_client() -> None:
    app = traced_app(secret="s3cret")

    async def go(c: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await c.get("/hello", headers={"X-Async-Trace": "s3cret"}),
            await c.get("/hello", headers={"X-Async-Trace": "1"}),
            await c.get("/hello", headers={"X-Async-Trace": "s3cre"}),
            await c.get("/__asynctrace/traces"),
            await c.get("/__asynctrace/traces", headers={"X-Async-Trace": "s3cret"}),
        ]

    ok, plain, near, store_closed, store_open = call(app, go, host="198.51.100.7")
    assert "x-async-trace-id" in ok.headers
    assert "x-async-trace-id" not in plain.headers and "x-async-trace-id" not in near.headers
    assert store_closed.status_code == 404  # passed through to the app, which has no such route
    assert [t["traceId"] for t in store_open.json()["traces"]] == [ok.headers["x-async-trace-id"]]


def test_sampled_requests_are_traced_without_any_response_header() -> None:
    app = traced_app(sample_rate=1.0)
    with capture_traces() as traces:
        r = call(app, lambda c: get_page(c, "/hello"), host="203.0.113.9")
    bare = call(Starlette(routes=routes()), lambda c: get_page(c, "/hello"))
    assert r.headers.raw == bare.headers.raw
    assert len(traces) == 1 and traces[0].annotations_of(1)["traced"] == "sampled"


@pytest.fixture(params=["C scan", "Python scan"])
def either_scan(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The untraced path's header scan in C, then in Python (as where there is no compiler)."""
    from asgi_asynctrace import _middleware

    if request.param == "Python scan":
        monkeypatch.setattr(_middleware, "_check", None)
    elif _middleware._check is None:
        pytest.skip("built without the C accelerator")


@pytest.mark.usefixtures("either_scan")
def test_sample_rate_traces_that_fraction_of_requests() -> None:
    traces: list[Trace] = []
    app = traced_app(sample_rate=0.25, sinks=[lambda t, d: traces.append(t)])

    async def go(c: httpx.AsyncClient) -> None:
        for _ in range(800):
            await c.get("/hello")

    call(app, go, host="203.0.113.9")
    # 200 expected; a binomial(800, 0.25) falls outside 140..260 about once in 10**7 runs
    assert 140 <= len(traces) <= 260
    assert {t.annotations_of(1)["traced"] for t in traces} == {"sampled"}


@pytest.mark.usefixtures("either_scan")
def test_max_sampled_per_s_caps_sampled_traces_not_requested_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asgi_asynctrace import _middleware

    now = [1000.0]
    monkeypatch.setattr(_middleware, "_clock", lambda: now[0])  # the budget's clock only
    traces: list[Trace] = []
    app = traced_app(sample_rate=1.0, max_sampled_per_s=4, sinks=[lambda t, d: traces.append(t)])

    async def burst(c: httpx.AsyncClient) -> None:
        for _ in range(30):
            assert (await c.get("/hello")).status_code == 200  # every request answered

    def traced(kind: str) -> int:
        return sum(t.annotations_of(1)["traced"] == kind for t in traces)

    call(app, burst, host="203.0.113.9")
    assert traced("sampled") == 4  # a second's worth at once, then none
    now[0] += 0.5
    call(app, burst, host="203.0.113.9")
    assert traced("sampled") == 6  # half a second later: two more
    # a request that asks is traced whatever the budget, and takes nothing from it
    call(app, lambda c: get_page(c, "/hello", ON))
    assert traced("requested") == 1
    now[0] += 0.25
    call(app, burst, host="203.0.113.9")
    assert traced("sampled") == 7
    with pytest.raises(ValueError, match="max_sampled_per_s must be > 0"):
        AsyncTraceMiddleware(app, max_sampled_per_s=0)


_PARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.skipif(_request._open_request is None, reason="the C accelerator is not built")
@pytest.mark.parametrize(
    ("scope", "traced"),
    [
        ({"type": "http", "method": "GET", "path": "/a", "client": ("10.0.0.7", 5),
          "headers": [(b"traceparent", _PARENT)]}, "sampled"),
        ({"type": "http", "method": "POST", "path": "/b", "client": None,
          "headers": ((b"traceparent", _PARENT.upper()),)}, "requested"),
        ({"type": "websocket", "path": "/ws", "client": ["::1", 9], "headers": []}, "requested"),
        ({"type": "http", "method": "", "headers": [[b"traceparent", _PARENT + b"0"]]}, "sampled"),
        ({"type": "http", "method": "GET", "path": "/c"}, "sampled"),
    ],
)  # fmt: skip
def test_a_trace_opened_in_c_is_the_one_the_python_opens(scope: Any, traced: str) -> None:
    owner = AsyncTraceMiddleware(PlainTextResponse("x"), record_futures=False,
                                 propagate_to={"svc": "s"}, instrument=False)  # fmt: skip
    websocket = scope["type"] == "websocket"
    open_request = _request._open_request
    assert open_request is not None
    made = open_request(scope, websocket, traced, owner._trace_settings)
    python = _request._open_in_python(owner, scope, websocket, traced)
    assert isinstance(made, Trace) and made.trace_id != python.trace_id
    assert made.request == python.request
    assert made.annotations == python.annotations and len(made.resources) == 1
    assert made.root.type == "root" and made.root.created_at == made.origin
    assert made.record_futures is False and made.propagate_to is owner.propagate_to
    assert made.limits is owner.limits and not made.closed and made.ended_at is None
    assert abs(made.started_at_unix_ns - python.started_at_unix_ns) < 10**9
    assert ("traceparent" in made.request) == (scope.get("headers") == [(b"traceparent", _PARENT)])


def test_a_trace_opened_in_c_hands_unusual_headers_to_the_python() -> None:
    open_request = _request._open_request
    if open_request is None:
        pytest.skip("the C accelerator is not built")
    owner = AsyncTraceMiddleware(PlainTextResponse("x"), instrument=False)
    for headers in (iter([(b"traceparent", _PARENT)]), [(b"traceparent", "text")]):
        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
        made = open_request(scope, False, "sampled", owner._trace_settings)
        assert made is NotImplemented


@pytest.mark.parametrize(
    "headers",
    [
        [(b"accept", b"*/*"), (b"x-async-trace", b"1")],  # what servers send: the C scan
        ((b"x-async-trace", b"1"),),
        [[b"x-async-trace", b"1"]],
        iter([(b"accept", b"*/*"), (b"x-async-trace", b"1")]),  # unusual: the Python scan
        [(bytearray(b"accept"), b"*/*"), (b"x-async-trace", b"1")],
    ],
)
def test_the_header_is_found_in_any_shape_of_header_list(headers: Any) -> None:
    traces: list[Trace] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    async def send(message: Any) -> None:
        pass

    wrapped = AsyncTraceMiddleware(app, log_traces=False, sinks=[lambda t, d: traces.append(t)])
    scope = {"type": "http", "path": "/", "headers": headers, "client": ("127.0.0.1", 1)}
    run(wrapped(scope, print, send))  # type: ignore[arg-type]
    assert len(traces) == 1
    assert failure_counts() == {}


def test_the_c_check_and_the_python_check_agree() -> None:
    from asgi_asynctrace import _middleware

    check = _middleware._check
    if check is None:
        pytest.skip("built without the C accelerator: only the Python check exists")
    mw = AsyncTraceMiddleware(lambda s, r, se: None, log_traces=False)  # type: ignore[arg-type,return-value]
    scopes: list[dict[str, Any]] = [
        {"type": "http", "path": "/x", "headers": [(b"a", b"1")]},
        {"type": "http", "path": "/x", "headers": [(b"x-async-trace", b"yes")]},
        {"type": "websocket", "path": "/__asynctrace/traces", "headers": []},
        {"type": "http", "path": "/__asynctracé", "headers": []},
        {"type": "http", "path": "/é/x", "headers": []},
        {"type": "lifespan"},
        {"type": "http"},
    ]
    for scope in scopes:
        value = check(scope, b"x-async-trace", "/__asynctrace")
        python_value, python_slow = mw._check_in_python(scope)
        if value is True:
            assert python_slow and python_value is None
        elif value is None:
            assert not python_slow
        else:
            assert python_slow and python_value == value


@pytest.mark.parametrize("shape", [tuple, list])
def test_a_traceparent_is_kept_however_the_server_shapes_its_headers(shape: Any) -> None:
    # Servers give (name, value) tuples; a list of lists is valid ASGI too, and is read by the
    # Python scan where the C one declines it.
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = [shape(p) for p in [(b"host", b"x"), (b"x-async-trace", b"1"),
                                  (b"traceparent", parent)]]  # fmt: skip
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": "/hello", "raw_path": b"/hello", "query_string": b"",
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000)}  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        sent.append(message)

    with capture_traces() as traces:
        run(traced_app(log_traces=False)(scope, receive, send))
    assert sent[-1]["body"] == b"hello"
    (trace,) = traces
    assert trace.request["traceparent"] == parent.decode()
    assert trace.annotations_of(trace.root.async_id)["traced"] == "requested"
