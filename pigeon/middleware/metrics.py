"""``Metrics``: the handler duration and in-flight gauges per queue."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pigeon.metrics import HANDLER_SECONDS, IN_FLIGHT

if TYPE_CHECKING:
    from pigeon.core.processor import Delivery
    from pigeon.middleware.base import CallNext


class Metrics:
    """Records ``pigeon_handler_duration_seconds{queue}`` and ``pigeon_in_flight{queue}``.

    It is in every app's middleware unless the app is given its own list
    (then add ``Metrics()`` to keep these two metrics). Outcome counts
    (``pigeon_messages_total``) are recorded by the worker regardless.
    """

    def __init__(self) -> None:
        self._children: dict[str, tuple[Any, Any]] = {}

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        queue = delivery.listener.queue
        children = self._children.get(queue)
        if children is None:
            children = self._children[queue] = (
                IN_FLIGHT.labels(queue),
                HANDLER_SECONDS.labels(queue),
            )
        gauge, histogram = children
        gauge.inc()
        started = time.perf_counter()
        try:
            await call_next(delivery)
        finally:
            gauge.dec()
            histogram.observe(time.perf_counter() - started)
