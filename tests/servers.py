"""Real servers for tests: an ASGI app under uvicorn in a thread, on a free loopback port.

with serving(app) as base:       # "http://127.0.0.1:<port>"
    httpx.get(base + "/")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from asgi_asynctrace import Trace, capture_traces


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app: Any, port: int | None = None, **config: Any) -> Iterator[str]:
    port = port or free_port()
    # uvicorn closes a connection idle for 5 s, the same age at which httpx stops reusing one:
    # when a loaded machine stalls the process for that long, the server's timer wins and a
    # client that reuses the connection gets a reset (seen once in CI). Tests here are about
    # traces, not keep-alive, so a connection stays open as long as a test may run.
    config.setdefault("timeout_keep_alive", 120)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def traced_get(base: str, path: str) -> tuple[httpx.Response, Trace]:
    """GET ``path`` of a served app with ``X-Async-Trace: 1``: the response, and its trace
    (finished once the response has gone out, so waited for a little)."""
    with capture_traces() as traces:
        response = httpx.get(f"{base}{path}", headers={"X-Async-Trace": "1"}, timeout=10)
        deadline = time.monotonic() + 5
        while not traces and time.monotonic() < deadline:
            time.sleep(0.01)
    (trace,) = traces
    return response, trace


def stored(url: str) -> httpx.Response:
    """GET a trace from an app's store, where it goes once its response is out: a moment after
    the client has the response, so asked again for up to 5 s while the answer is 404."""
    deadline = time.monotonic() + 5
    while (got := httpx.get(url)).status_code == 404 and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def sample_app_process(env: dict[str, str], stderr: Any = None) -> Iterator[tuple[str, Any]]:
    """The sample app as a user runs it: ``uvicorn sample_app.app:app`` in its own process.

    Yields the base URL and the process (``stderr=subprocess.PIPE`` to read its log lines).
    """
    with app_process(["uvicorn", "sample_app.app:app"], env, stderr) as got:
        yield got


@contextlib.contextmanager
def app_process(
    command: list[str], env: dict[str, str], stderr: Any = None
) -> Iterator[tuple[str, Any]]:
    """``python -m <command> --port <free port>`` from the project's root, once it answers
    ``GET /``: the base URL and the process."""
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", *command, "--port", str(port)],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL if stderr is None else stderr,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(base + "/", timeout=1)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{' '.join(command)} did not start") from None
            time.sleep(0.1)
    try:
        yield base, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()
