"""Perfetto export, read back with the perfetto package's own protobufs."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace as PerfettoTrace
from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackEvent

from asgi_asynctrace import AsyncTraceMiddleware, Trace, failure_counts, load_trace
from asgi_asynctrace._cli import main
from asgi_asynctrace._perfetto import to_perfetto
from tests.helpers import call, traced

GOLDEN = Path(__file__).parent / "golden"
BEGIN, END, INSTANT = (TrackEvent.Type.TYPE_SLICE_BEGIN, TrackEvent.Type.TYPE_SLICE_END,
                       TrackEvent.Type.TYPE_INSTANT)  # fmt: skip


def sample_trace() -> Trace:
    async def leaf(ms: int) -> int:
        await asyncio.sleep(ms / 1000)
        return ms

    async def body() -> None:
        await asyncio.gather(leaf(2), leaf(4))
        await asyncio.to_thread(sum, [1, 2])

    return traced(body, futures=True)


def check(data: bytes) -> dict[str, Any]:
    """Parse a .pftrace and check its structure; return what it holds, for more asserts."""
    parsed = PerfettoTrace.FromString(data)
    tracks: dict[int, Any] = {}
    events: dict[int, list[Any]] = {}
    for packet in parsed.packet:
        assert packet.trusted_packet_sequence_id
        if packet.HasField("track_descriptor"):
            tracks[packet.track_descriptor.uuid] = packet.track_descriptor
        elif packet.HasField("track_event"):
            assert packet.track_event.track_uuid in tracks, "an event before its track"
            events.setdefault(packet.track_event.track_uuid, []).append(packet)
    flows_out: Counter[int] = Counter()
    flows_in: Counter[int] = Counter()
    for uuid, packets in events.items():
        times = [p.timestamp for p in packets]
        assert times == sorted(times), f"track {tracks[uuid].name}: time goes backwards"
        depth = 0
        for p in packets:
            ev = p.track_event
            if ev.type == BEGIN:
                depth += 1
                flows_in.update(ev.terminating_flow_ids)
            elif ev.type == END:
                depth -= 1
                assert depth >= 0, f"track {tracks[uuid].name}: an end without a begin"
            elif ev.type == INSTANT:
                flows_out.update(ev.flow_ids)
        assert depth == 0, f"track {tracks[uuid].name}: a slice never ends"
    # every flow joins exactly two slices: the creation instant and the new resource's slice
    assert flows_out == flows_in and set(flows_out.values()) <= {1}
    return {"tracks": tracks, "events": events, "flows": set(flows_out)}


def test_every_resource_is_a_track_with_its_life_steps_and_an_arrow_from_its_trigger() -> None:
    trace = sample_trace()
    got = check(to_perfetto(trace))
    groups = [t for t in got["tracks"].values() if not t.parent_uuid]
    assert len(groups) == 1 and groups[0].name.startswith("GET / ")
    lanes = [t for t in got["tracks"].values() if t.parent_uuid]
    assert len(lanes) == len(trace.resources)
    assert len(got["flows"]) == len(trace.resources) - 1  # everything but the root has a trigger
    task = next(r for r in trace.resources if r.type == "task")
    (uuid,) = [u for u, t in got["tracks"].items() if t.name.endswith(f"#{task.async_id}")]
    packets = got["events"][uuid]
    life = packets[0].track_event
    notes = {a.name: a for a in life.debug_annotations}
    assert life.name == "task leaf" and notes["state"].string_value == "ok"
    assert notes["coroutine"].string_value.endswith("leaf")
    assert "body @ tests/test_perfetto.py" in notes["stack"].string_value
    steps = [p for p in packets if p.track_event.type == BEGIN][1:]
    assert len(steps) == len(task.intervals())
    assert packets[0].timestamp == trace.started_at_unix_ns + (task.created_at - trace.origin)


def test_a_loaded_trace_and_several_traces_in_one_file_convert_too() -> None:
    golden = load_trace((GOLDEN / "checkout.json").read_bytes())
    got = check(to_perfetto(golden, sample_trace()))
    assert len([t for t in got["tracks"].values() if not t.parent_uuid]) == 2


def test_the_middleware_streams_every_trace_into_one_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "requests.pftrace"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.001)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapped = AsyncTraceMiddleware(app, log_traces=False, perfetto_path=path)

    async def requests(client: Any) -> list[int]:
        codes = []
        for traced_request in (True, False, True):
            headers = {"X-Async-Trace": "1"} if traced_request else {}
            codes.append((await client.get("/", headers=headers)).status_code)
            if traced_request:  # after each trace the file is whole
                check(path.read_bytes())
        return codes

    assert call(wrapped, requests) == [204, 204, 204]
    got = check(path.read_bytes())
    assert len([t for t in got["tracks"].values() if not t.parent_uuid]) == 2


def test_an_unwritable_perfetto_path_never_reaches_the_app(tmp_path: Path) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"fine"})

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where a directory should be")
    wrapped = AsyncTraceMiddleware(app, log_traces=False, perfetto_path=blocked / "x.pftrace")

    async def two(client: Any) -> list[str]:
        return [(await client.get("/", headers={"X-Async-Trace": "1"})).text for _ in range(2)]

    assert call(wrapped, two) == ["fine", "fine"]
    assert failure_counts() == {"sink:perfetto": 2}


def test_cli_convert_writes_a_perfetto_file(tmp_path: Path) -> None:
    out = tmp_path / "checkout.pftrace"
    assert main(["convert", str(GOLDEN / "checkout.json"), "--to", "perfetto", "-o", str(out)]) == 0
    got = check(out.read_bytes())
    assert len(got["flows"]) == 4
    assert os.path.getsize(out) > 0


def test_a_step_that_blocked_the_loop_is_marked_where_the_watchdog_saw_it() -> None:
    async def body() -> None:
        await asyncio.sleep(0)
        time.sleep(0.15)  # well past the 20 ms threshold: sampled inside it on a busy host too

    trace = traced(body)
    assert trace.samples
    got = check(to_perfetto(trace))
    (uuid,) = [u for u, t in got["tracks"].items() if t.name.endswith("#1")]
    packets = got["events"][uuid]
    marks = [p for p in packets if list(p.track_event.categories) == ["blocked"]]
    assert len(marks) == len(trace.samples)
    for mark, (_, at, frames) in zip(marks, trace.samples, strict=True):
        assert mark.track_event.name == f"blocked at {frames[0]}"
        assert "body @ tests/test_perfetto.py:" in frames[0]
        (stack,) = [a for a in mark.track_event.debug_annotations if a.name == "stack"]
        assert stack.string_value == "\n".join(frames)
        assert mark.timestamp == trace.started_at_unix_ns + (at - trace.origin)
    # inside the step that blocked: after its begin, before its end
    i = packets.index(marks[0])
    assert packets[i - 1].track_event.type == BEGIN and packets[i - 1].track_event.name == "step"


def _worker_writes(path: str, first: int, start: Any) -> None:
    """One worker process's sink: 40 /slow traces (216 KB of packets each), each its own id,
    written once both workers are ready."""
    from asgi_asynctrace._perfetto import PerfettoSink

    doc = orjson.loads((Path(__file__).parent.parent / "sample_app/traces/slow.json").read_bytes())
    traces = []
    for n in range(first, first + 40):
        doc["traceId"] = f"{n:032x}"
        traces.append(load_trace(doc))
    sink = PerfettoSink(path)
    start.wait(30)
    for trace in traces:
        sink(trace, None)


def test_worker_processes_streaming_into_one_file_leave_it_valid(tmp_path: Path) -> None:
    # Under `uvicorn --workers 2` with one perfetto_path, both processes append to the file at
    # once: each packet reaches the file in one write (the file is opened to append), so the
    # two processes' traces interleave packet by packet, which a reader takes as it would one
    # process's: every track's events still in order.
    import multiprocessing

    path = str(tmp_path / "workers.pftrace")
    context = multiprocessing.get_context("spawn")  # (fork warns in a process with threads)
    start = context.Barrier(2)
    workers = [context.Process(target=_worker_writes, args=(path, first, start))
               for first in (1, 101)]  # fmt: skip
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    got = check(Path(path).read_bytes())
    assert len([t for t in got["tracks"].values() if not t.parent_uuid]) == 80
