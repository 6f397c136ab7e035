"""Behind a real reverse proxy (nginx, as installed, its buffers left as they come), a request
that asks for its trace still gets its response: the trace in the header only when the
response's headers still fit where nginx reads them."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from asgi_asynctrace import AsyncTraceMiddleware, annotate, decode_trace_header
from tests.servers import free_port, serving, stored

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")

pytestmark = pytest.mark.skipif(
    NGINX is None and not os.environ.get("CI"),
    reason="needs nginx: apt-get install -y nginx-light",
)

ON = {"X-Async-Trace": "1"}


async def big(request: Request) -> Response:
    # Notes that do not compress: their trace comes to 5-7 KiB in the header, over the
    # 4 KiB nginx reads a response's headers into and under the old default limit of 8,192.
    for i in range(36):
        annotate(f"note{i}", os.urandom(100).hex())
    return PlainTextResponse("big")


async def small(request: Request) -> Response:
    return PlainTextResponse("small")


def _app(header_limit: int | None = None) -> AsyncTraceMiddleware:
    app = Starlette(routes=[Route("/big", big), Route("/small", small)])
    return AsyncTraceMiddleware(app, log_traces=False, header_limit=header_limit)


@contextlib.contextmanager
def nginx(tmp: Path, upstreams: dict[str, str]) -> Iterator[str]:
    """nginx on a free loopback port, proxying ``/<name>/...`` to each upstream's ``/...``,
    with nothing of its proxy settings changed; its base URL."""
    port = free_port()
    temp = " ".join(f"{kind}_temp_path {tmp};" for kind in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))  # fmt: skip
    locations = "\n".join(f"location /{name}/ {{ proxy_pass {base}/; }}"
                          for name, base in upstreams.items())  # fmt: skip
    (tmp / "nginx.conf").write_text(
        f"daemon off; master_process off; pid {tmp}/nginx.pid; error_log {tmp}/error.log;\n"
        f"events {{}}\nhttp {{ access_log off; {temp}\n"
        f"server {{ listen 127.0.0.1:{port};\n{locations}\n}} }}\n"
    )
    assert NGINX is not None, "nginx is not installed: apt-get install -y nginx-light"
    proc = subprocess.Popen([NGINX, "-c", str(tmp / "nginx.conf"), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"nginx did not start: {(tmp / 'error.log').read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_traced_request_through_nginx_gets_its_response_not_a_502(tmp_path: Path) -> None:
    with (
        serving(_app()) as default,
        serving(_app(header_limit=8192)) as fixed,
        nginx(tmp_path, {"default": default, "fixed": fixed}) as proxy,
    ):
        got = httpx.get(proxy + "/default/big", headers=ON)
        assert got.status_code == 200 and got.text == "big"
        data = got.headers["x-async-trace-data"]
        assert data.startswith("omitted: ") and "kept within 4096" in data, data
        # where the header says the trace is, through the same proxy
        got_trace = stored(proxy + "/default" + data.rsplit("; GET ", 1)[1])
        assert got_trace.status_code == 200
        assert got_trace.json()["traceId"] == got.headers["x-async-trace-id"]

        fits = httpx.get(proxy + "/default/small", headers=ON)
        assert fits.status_code == 200 and fits.text == "small"
        inline = decode_trace_header(fits.headers["x-async-trace-data"])
        assert inline["traceId"] == fits.headers["x-async-trace-id"]

        # What the default keeps clear of: the same trace inline, under a fixed 8 KiB limit,
        # is more than nginx reads headers into, and the client gets nginx's 502.
        direct = httpx.get(fixed + "/big", headers=ON)
        assert 4096 < len(direct.headers["x-async-trace-data"]) <= 8192
        assert httpx.get(proxy + "/fixed/big", headers=ON).status_code == 502
        assert "too big header" in (tmp_path / "error.log").read_text()
