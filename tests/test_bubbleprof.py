"""Export to clinic bubbleprof's data format, checked by bubbleprof itself (npm
``@clinic/bubbleprof``, installed here on first use): its decoders read our files and its
visualizer turns them into its HTML page, which a headless Chromium draws."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asgi_asynctrace import Trace, load_trace
from asgi_asynctrace._bubbleprof import write_bubbleprof
from asgi_asynctrace._cli import main

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "build" / "node"
SAMPLES = ROOT / "sample_app" / "traces"

DECODE = """
const path = require('path'), fs = require('fs')
const { getLoggingPaths } = require('@clinic/clinic-common')
const Stack = require('@clinic/bubbleprof/format/stack-trace-decoder.js')
const Events = require('@clinic/bubbleprof/format/trace-event-decoder.js')
const paths = getLoggingPaths('bubbleprof')({ path: process.argv[1] })
const out = { stacks: [], events: [] }
fs.createReadStream(paths['/stacktrace']).pipe(new Stack())
  .on('data', (m) => out.stacks.push(m))
  .on('end', () => fs.createReadStream(paths['/traceevent']).pipe(new Events())
    .on('data', (e) => out.events.push(e))
    .on('end', () => console.log(JSON.stringify(out))))
"""
VISUALIZE = """
const Bubbleprof = require('@clinic/bubbleprof')
new Bubbleprof().visualize(process.argv[1], process.argv[2], (err) => {
  if (err) { console.error(err); process.exit(1) }
})
"""


@pytest.fixture(scope="module")
def node() -> Iterator[Path]:
    if shutil.which("npm") is None or shutil.which("node") is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the bubbleprof tests")
        pytest.skip("needs node and npm (apt-get install -y nodejs npm)")
    if not (NODE_DIR / "node_modules" / "@clinic" / "bubbleprof").exists():
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        command = ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR),
                   "@clinic/bubbleprof@10"]  # fmt: skip
        subprocess.run(command, check=True, capture_output=True, timeout=600)
    yield NODE_DIR


def run_node(node_dir: Path, script: str, *args: str) -> str:
    done = subprocess.run(["node", "-e", script, *args], cwd=node_dir, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def samples() -> list[Trace]:
    return [load_trace(p.read_bytes()) for p in sorted(SAMPLES.glob("*.json"))]


def test_bubbleprofs_own_decoders_read_every_frame_and_event(node: Path, tmp_path: Path) -> None:
    traces = samples()
    where = write_bubbleprof(traces, tmp_path)
    decoded: dict[str, Any] = json.loads(run_node(node, DECODE, where))
    assert len(decoded["stacks"]) == sum(len(t.resources) for t in traces)
    frames = [f for s in decoded["stacks"] for f in s["frames"]]
    fields = {"functionName", "typeName", "isEval", "isConstructor", "isNative", "isToplevel",
              "evalOrigin", "fileName", "lineNumber", "columnNumber"}  # fmt: skip
    assert all(fields <= set(f) for f in frames)
    files = {f["fileName"] for f in frames}
    assert "/app/sample_app/patterns.py" in files  # the app's own code, under mainDirectory
    assert any(f.startswith("/app/node_modules/starlette/") for f in files)  # a dependency
    assert any(f.startswith("node:asyncio.") for f in files)  # the runtime, as node core
    items = next(f for f in frames if f["functionName"] == "load_items")
    assert items["lineNumber"] > 0 and items["columnNumber"] > 0
    kinds = {(e["event"], e["type"]) for e in decoded["events"]}
    assert {("init", "PROMISE"), ("before", "PROMISE"), ("after", "PROMISE"),
            ("destroy", "PROMISE"), ("init", "Timeout"), ("init", "TCPWRAP")} <= kinds  # fmt: skip
    roots = [e for e in decoded["events"] if e["event"] == "init" and e["triggerAsyncId"] == 1]
    assert len(roots) == len(traces)  # each request hangs off bubbleprof's root, id 1


def test_bubbleprof_renders_its_page_from_our_export(node: Path, tmp_path: Path) -> None:
    out = tmp_path / "traces"
    assert main(["convert", *map(str, sorted(SAMPLES.glob("*.json"))), "--to", "bubbleprof",
                 "-o", str(out)]) == 0  # fmt: skip
    where = out / "asynctrace.clinic-bubbleprof"
    html = tmp_path / "bubbleprof.html"
    run_node(node, VISUALIZE, str(where), str(html))
    page = html.read_text()
    assert "Bubbleprof" in page and "upstream_price" in page

    if not os.path.exists("/usr/bin/chromium"):
        return
    from playwright.sync_api import sync_playwright

    from tests.viewer.pages import ARGS

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(html.as_uri())
        tab.wait_for_selector("svg circle", timeout=20_000)
        assert tab.locator("svg circle").count() >= 5
        if "upstream_price" not in tab.inner_text("body"):
            # Bubbleprof folds the smaller bubbles under the root into "miscellaneous" when
            # there are many (the sample app's sleeps, 10 ms each among 200 ms): open it.
            tab.locator("text.in-circle-label").first.click()
            tab.wait_for_timeout(1000)
        tab.screenshot(path=str(ROOT / "build" / "screenshots" / "bubbleprof.png"))
        assert "upstream_price" in tab.inner_text("body")
        browser.close()
    assert errors == []  # (its page may fail to fetch web fonts offline: not a script error)


def test_bubbleprof_needs_a_directory(capsys: pytest.CaptureFixture[str]) -> None:
    golden = str(Path(__file__).parent / "golden" / "checkout.json")
    assert main(["convert", golden, "--to", "bubbleprof"]) == 2
    assert "give it with -o DIR" in capsys.readouterr().err
