"""aio-pika publish / get / iterate / consume against the real RabbitMQ on 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aio_pika
import pytest

from asgi_asynctrace import Trace, instrument
from tests.helpers import traced

pytestmark = pytest.mark.service("rabbitmq")
URL = "amqp://guest:guest@127.0.0.1:5672/"
SECRET = b"card-number-4111"


@pytest.fixture(autouse=True)
def _pika_on() -> None:
    assert instrument("aio_pika") == {"aio_pika": True}


def queue_ops(trace: Trace) -> list[tuple[str, dict[str, Any], str]]:
    return [(r.type, trace.annotations_of(r.async_id), r.state) for r in trace.resources
            if r.type.startswith("queue-")]  # fmt: skip


def test_publish_get_iterate_and_consume_inside_a_request() -> None:
    name = f"asynctrace-test-{uuid.uuid4().hex[:8]}"
    handled: list[bytes] = []

    async def body() -> None:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(name)
            for _ in range(2):
                await channel.default_exchange.publish(aio_pika.Message(SECRET), routing_key=name)
            got = await queue.get(timeout=5)
            assert got is not None
            await got.ack()
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    break
            assert await queue.get(fail=False, timeout=5) is None
            done = asyncio.Event()

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    handled.append(message.body)
                    done.set()

            tag = await queue.consume(on_message)
            await channel.default_exchange.publish(aio_pika.Message(b"third"), routing_key=name)
            await asyncio.wait_for(done.wait(), 5)
            await queue.cancel(tag)
            await queue.delete()

    trace = traced(body)
    assert handled == [b"third"]
    ops = [(t, n.get("op"), n.get("hit"), n.get("bytes"), s) for t, n, s in queue_ops(trace)]
    assert ops == [
        ("queue-send", None, None, len(SECRET), "ok"),
        ("queue-send", None, None, len(SECRET), "ok"),
        ("queue-receive", "get", True, len(SECRET), "ok"),
        ("queue-receive", "iterate", None, len(SECRET), "ok"),
        ("queue-receive", "get", False, None, "ok"),
        ("queue-send", None, None, 5, "ok"),
        ("queue-receive", "consume", None, 5, "ok"),
    ]
    sends = [n for t, n, _ in queue_ops(trace) if t == "queue-send"]
    assert sends[0]["routingKey"] == name and sends[0]["exchange"] == "(default)"
    consumed = [r for r in trace.resources if r.type == "queue-receive"][-1]
    assert len(consumed.callbacks) == 2  # the callback's run is its step
    assert SECRET.decode() not in trace.to_json().decode()
