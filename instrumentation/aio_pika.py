"""aio-pika (RabbitMQ) as ``queue-send`` and ``queue-receive`` resources.

    asgi_asynctrace.instrument("aio_pika")    # the middleware does this by default

Inside a traced request: ``Exchange.publish`` is a ``queue-send`` (``exchange``,
``routingKey``, ``bytes``, ``error``), alive until the broker confirms; ``Queue.get`` is a
``queue-receive`` (``queue``, ``hit``: whether a message was there), and so is each message
taken from ``Queue.iterator()``, alive while the request waited for it. A callback given to
``Queue.consume`` from a traced request records each message it handles as a
``queue-receive`` of that request, with the callback's run as its callback interval, until the
request's trace closes. Message bodies and headers are never recorded. aio-pika has no hook
for this, so these methods are wrapped, and put back by ``uninstrument("aio_pika")``.
Supports aio-pika >= 9. Exports: AioPikaInstrumentation, instrumentation.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from asgi_asynctrace import start_resource
from asgi_asynctrace._context import ACTIVE, new_resource, settle_from_exception
from asgi_asynctrace._failures import report

from ._base import Instrumentation

__all__ = ["AioPikaInstrumentation", "instrumentation"]

_now = time.perf_counter_ns


def _wrap_publish(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def publish(self: Any, message: Any, routing_key: str, *args: Any, **kw: Any) -> Any:
        if ACTIVE.get() is None:
            return await original(self, message, routing_key, *args, **kw)
        body = getattr(message, "body", b"") or b""
        with start_resource("queue-send", exchange=str(getattr(self, "name", "") or "(default)"),
                            routingKey=str(routing_key), bytes=len(body)):  # fmt: skip
            return await original(self, message, routing_key, *args, **kw)

    return publish


def _wrap_get(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def get(self: Any, *args: Any, **kwargs: Any) -> Any:
        if ACTIVE.get() is None:
            return await original(self, *args, **kwargs)
        with start_resource("queue-receive", queue=str(self.name), op="get") as scope:
            message = await original(self, *args, **kwargs)
            scope.annotate("hit", message is not None)
            if message is not None:
                scope.annotate("bytes", len(message.body or b""))
            return message

    return get


def _wrap_anext(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def __anext__(self: Any) -> Any:
        if ACTIVE.get() is None:
            return await original(self)
        queue = getattr(getattr(self, "_amqp_queue", None), "name", "")
        with start_resource("queue-receive", queue=str(queue), op="iterate") as scope:
            message = await original(self)
            scope.annotate("bytes", len(message.body or b""))
            return message

    return __anext__


def _wrap_consume(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    async def consume(self: Any, callback: Callable[[Any], Awaitable[Any]], *args: Any,
                      **kwargs: Any) -> Any:  # fmt: skip
        active = ACTIVE.get()
        # Queue.iterator() consumes into its own buffer: its messages are recorded as they
        # are taken from it (__anext__), not twice.
        own = type(getattr(callback, "__self__", None)).__name__ == "QueueIterator"
        if active is not None and not own:
            callback = _traced_callback(callback, active[0], active[1], str(self.name))
        return await original(self, callback, *args, **kwargs)

    return consume


def _traced_callback(callback: Callable[[Any], Awaitable[Any]], trace: Any, parent: Any,
                     queue: str) -> Callable[[Any], Awaitable[Any]]:  # fmt: skip
    """Each message handled becomes a queue-receive of the request that started consuming."""

    @functools.wraps(callback)
    async def handle(message: Any) -> Any:
        if trace.closed:
            return await callback(message)
        res = None
        token = None
        try:
            res = new_resource("queue-receive", trace, parent)
            if res is not None:
                trace.annotate(res, "queue", queue)
                trace.annotate(res, "op", "consume")
                trace.annotate(res, "bytes", len(getattr(message, "body", b"") or b""))
                trace.begin(res, _now())
                token = ACTIVE.set((trace, res))
        except Exception as exc:
            report("aio_pika", exc)
        try:
            result = await callback(message)
        except BaseException as exc:
            if res is not None:
                trace.end(res, _now())
                settle_from_exception(trace, res, _now(), exc)
            raise
        finally:
            if token is not None:
                ACTIVE.reset(token)
        if res is not None:
            now = _now()
            trace.end(res, now)
            trace.settle(res, now, "ok")
        return result

    return handle


class AioPikaInstrumentation(Instrumentation):
    name = "aio_pika"
    library = "aio_pika"
    supported = (9,)

    def _install(self, module: ModuleType) -> None:
        from aio_pika.exchange import Exchange
        from aio_pika.queue import Queue, QueueIterator

        self.patches.replace(Exchange, "publish", _wrap_publish(Exchange.publish))
        self.patches.replace(Queue, "get", _wrap_get(Queue.get))
        self.patches.replace(Queue, "consume", _wrap_consume(Queue.consume))
        self.patches.replace(QueueIterator, "__anext__", _wrap_anext(QueueIterator.__anext__))


instrumentation = AioPikaInstrumentation()
