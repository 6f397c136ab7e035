"""A Django project's ASGI application, wrapped by the middleware and served by uvicorn: its
async views' awaits and fetches, and its sync views' run in asgiref's worker thread."""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from asgi_asynctrace import AsyncTraceMiddleware, analyze
from tests.helpers import price_twice
from tests.servers import serving, traced_get

django: Any = pytest.importorskip("django")


async def report(request: Any) -> Any:
    """An async view: a sleep, then the same price fetched twice (once would do)."""
    http: Any = importlib.import_module("django.http")
    return http.JsonResponse({"prices": await price_twice()})


def ledger(request: Any) -> Any:
    """A sync view: Django runs it in asgiref's worker thread."""
    http: Any = importlib.import_module("django.http")
    time.sleep(0.004)
    return http.HttpResponse("ledger")


urlpatterns: list[Any] = []


@pytest.fixture(scope="module")
def django_app() -> Iterator[str]:
    settings: Any = importlib.import_module("django.conf").settings
    if not settings.configured:
        settings.configure(
            DEBUG=False,
            SECRET_KEY="tests-only",
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            INSTALLED_APPS=[],
            MIDDLEWARE=[],
        )
    django.setup()
    urls: Any = importlib.import_module("django.urls")
    urlpatterns[:] = [urls.path("report/", report), urls.path("ledger/", ledger)]
    asgi: Any = importlib.import_module("django.core.asgi")
    app = AsyncTraceMiddleware(asgi.get_asgi_application(), log_traces=False)
    with serving(app, lifespan="off") as base:
        yield base


def test_an_async_django_view_records_its_awaits_and_fetches(django_app: str) -> None:
    response, trace = traced_get(django_app, "/report/")
    assert response.status_code == 200 and response.json() == {"prices": ["1.5", "1.5"]}
    assert response.headers["x-async-trace-id"] == trace.trace_id
    assert trace.request["path"] == "/report/" and trace.request["status"] == 200
    fetches = [r for r in trace.resources if r.type == "fetch"]
    assert len(fetches) == 2 and all(r.state == "ok" for r in fetches)
    kinds = [trace.annotations_of(r.async_id).get("kind") for r in trace.resources]
    assert kinds.count("sleep") >= 3  # the view's own and the upstream's two
    a = analyze(trace)
    # what held it up is the view, not the task Django runs beside it listening for the
    # client going away (which ends only once the response is out, or is then cancelled):
    # the view's two fetches, then its response (the view is a task of its own before
    # Django 6, the request's own code from 6 on; stretches of its own code left aside)
    path = [(s.type, s.label) for s in a.critical_path if s.type not in ("timer", "root")]
    assert ("task", "ASGIHandler.listen_for_disconnect") not in path
    assert path[-3:] == [("fetch", "GET http://pricing/price")] * 2 + [
        ("stream-write", "response body, 26 bytes")]  # fmt: skip
    # the repeat is placed in the app's own code (the helper the view called)
    (repeat,) = [f for f in a.findings if f.kind == "repeated-read"]
    assert repeat.site.startswith("price_twice @ tests/helpers.py:")
    assert any(frame.startswith("report @ tests/test_django.py:") for frame in repeat.stack)


def test_a_sync_django_view_runs_in_a_recorded_thread(django_app: str) -> None:
    response, trace = traced_get(django_app, "/ledger/")
    assert response.status_code == 200 and response.text == "ledger"
    threads = [r for r in trace.resources if r.type == "thread"]
    assert threads and all(r.state == "ok" for r in threads)
    # the view's 4 ms ran inside one of them
    ran = max(r.callbacks[1] - r.callbacks[0] for r in threads if len(r.callbacks) >= 2)
    assert ran >= 4_000_000
