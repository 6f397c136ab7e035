"""trace-v1.schema.json: every trace the tracer writes meets it, and what the loader refuses it
refuses too."""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from asgi_asynctrace import TraceFormatError, load_trace
from tests.helpers import traced

ROOT = Path(__file__).resolve().parent.parent


def _schema() -> Draft202012Validator:
    text = (resources.files("asgi_asynctrace") / "trace-v1.schema.json").read_bytes()
    schema = orjson.loads(text)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


SCHEMA = _schema()
WRITTEN = [
    *sorted((ROOT / "sample_app" / "traces").glob("*.json")),
    ROOT / "tests" / "golden" / "checkout.json",
    ROOT / "asgi_asynctrace" / "viewer" / "demo.json",
]


@pytest.mark.parametrize("path", WRITTEN, ids=lambda p: p.name)
def test_the_traces_the_tracer_wrote_meet_the_schema(path: Path) -> None:
    doc = orjson.loads(path.read_bytes())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in SCHEMA.iter_errors(doc)]
    assert errors == []
    # and a trace read back and written again still does
    assert list(SCHEMA.iter_errors(load_trace(doc).to_dict())) == []


def test_a_trace_made_now_meets_the_schema() -> None:
    # the slow sample has the watchdog's samples; this one has its own kind of resource
    doc = orjson.loads(traced(_work).to_json())
    assert {r["type"] for r in doc["resources"]} >= {"root", "task", "timer", "settle-invoice"}
    assert list(SCHEMA.iter_errors(doc)) == []
    assert "samples" in orjson.loads((ROOT / "sample_app/traces/slow.json").read_bytes())


async def _work() -> None:
    import asyncio

    from asgi_asynctrace import start_resource

    async with start_resource("settle-invoice", invoice=7, paid=True, amount=1.5, note=None):
        await asyncio.gather(asyncio.sleep(0.001), asyncio.sleep(0))


def _broken(change: str) -> dict[str, Any]:
    doc = copy.deepcopy(orjson.loads((ROOT / "tests" / "golden" / "checkout.json").read_bytes()))
    res = doc["resources"][1]
    if change == "no duration":
        del doc["requestDurationNs"]
    elif change == "a state of its own":
        res["state"] = "done"
    elif change == "a callback without its end":
        res["callbacks"] = [[5]]
    elif change == "a stack id as text":
        res["stackTraceId"] = "0"
    elif change == "an object as an annotation's value":
        doc["annotations"][0]["value"] = {"nested": 1}
    elif change == "another version":
        doc["version"] = 2
    return doc  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "change",
    ["no duration", "a state of its own", "a callback without its end", "a stack id as text",
     "an object as an annotation's value", "another version"],
)  # fmt: skip
def test_what_the_loader_refuses_the_schema_refuses(change: str) -> None:
    doc = _broken(change)
    assert list(SCHEMA.iter_errors(doc)), change
    with pytest.raises(TraceFormatError):
        load_trace(doc)
