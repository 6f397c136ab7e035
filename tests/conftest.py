"""Every test starts with the tracer's failure counts at zero; tests that need a local
service (Redis, ...) say which one is missing. In CI (``CI`` set) a missing service fails."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from asgi_asynctrace import reset_failures

# service -> (host, port, how to start it)
SERVICES = {
    "rabbitmq": ("127.0.0.1", 5672, "rabbitmq-server -detached"),
    "postgres": (
        "127.0.0.1",
        5432,
        "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    ),
    "redis": (
        "127.0.0.1",
        6379,
        "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no",
    ),
}


@pytest.fixture(autouse=True)
def _fresh_failure_counts() -> Iterator[None]:
    reset_failures()
    yield


@pytest.fixture(autouse=True)
def _no_gc_resources(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A garbage collection of 1 ms or more in a traced step becomes a ``gc`` resource, and
    when one comes depends on everything the test process did before: tests that compare
    traces resource by resource would pass or fail by chance. Off, but where a test is
    marked ``gc_resources`` (the tests of that recording)."""
    if request.node.get_closest_marker("gc_resources") is None:
        from asgi_asynctrace import _watchdog

        monkeypatch.setattr(_watchdog, "GC_MIN_NS", 2**62)


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker in item.iter_markers("service"):
            (name,) = marker.args
            host, port, start = SERVICES[name]
            if _answers(host, port):
                continue
            message = (
                f"needs {name} on {host}:{port}, which is not answering; start it with: {start}"
            )
            if os.environ.get("CI"):
                raise pytest.UsageError(message)
            item.add_marker(pytest.mark.skip(reason=message))
