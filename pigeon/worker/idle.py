"""Asking the broker what is still waiting for a worker: the broker half of ``Worker.join()``.

A worker is idle when it handles nothing, has written every ack, and the
broker holds nothing more for it: no message ready in its queues, none
waiting in a retry tier. The main queues are asked on the consumer channels
themselves: the broker answers a ``queue.declare`` on a channel only after
every delivery it sent that channel before, so once the answer is read each
of those deliveries has reached the worker (the fast path hands a delivery
over the moment its last frame is read). A tier queue that does not exist
(yet, or any more) holds nothing.

One look is not enough: a message whose delay is over is dead-lettered from
its tier back into its queue by the broker, and in between it is counted in
neither. So the tiers are asked before the queues, and the worker is idle
only once every look for :data:`QUIET` seconds (two at least) found nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity

POLL = 0.01
"""Seconds between looks while a worker is still busy."""

QUIET = 0.05
"""Seconds for which every look must find nothing before the worker counts as idle."""


async def ready_messages(
    consumers: Sequence[tuple[AbstractChannel, str]],
    tiers: Iterable[str],
    connection: AbstractConnection,
) -> int:
    """How many messages the broker holds for these consumers (queue, channel) and tiers."""
    total = 0
    side: AbstractChannel | None = None
    try:
        for tier in sorted(tiers):
            if side is None or side.is_closed:
                side = await connection.channel()
            try:
                declared = await side.declare_queue(tier, passive=True)
            except ChannelNotFoundEntity:  # no such tier: nothing waits in it
                continue
            total += declared.declaration_result.message_count or 0
    finally:
        if side is not None and not side.is_closed:
            await side.close()
    for channel, queue in consumers:  # after the tiers: what left a tier is found here
        declared = await channel.declare_queue(queue, passive=True)
        total += declared.declaration_result.message_count or 0
    return total
