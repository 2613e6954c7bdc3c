"""Consuming: one listener's subscription, and turning what arrives into a ``Delivery``.

The worker sees a queue's deliveries through :class:`Subscription` (open,
consume, raise the prefetch, subscribe again, cancel, close) and settles them
through its :class:`~pigeon.amqp.acks.Acker`; it never touches an aiormq
channel. :func:`delivery_of` reads the frames' properties into the
broker-free :class:`~pigeon.core.processor.Delivery` the processor works on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection

from pigeon.amqp.acks import Acker
from pigeon.amqp.frames import attach_deliveries
from pigeon.amqp.hints import hint_competitors
from pigeon.amqp.unmarshal import problems_of
from pigeon.core.listener import Listener
from pigeon.core.processor import Delivery

__all__ = ["Incoming", "OnDelivery", "Subscription", "delivery_of"]

Incoming = aiormq.abc.DeliveredMessage
"""What arrives: ``delivery_tag``, ``redelivered``, ``routing_key``, ``body`` and the
header frame. Hand it to :func:`delivery_of`; settle it by its ``delivery_tag``."""

OnDelivery = Callable[[Incoming], None]
"""Called once per delivery, in order, on the event loop; it must not block."""


@dataclass(eq=False, slots=True)
class Subscription:
    """One queue consumed on its own channel: the channel, the acker, the consumer tag."""

    queue: str
    channel: AbstractChannel
    acker: Acker
    _underlay: aiormq.abc.AbstractChannel
    tag: str = ""
    _on_message: Any = None

    @classmethod
    async def open(
        cls, connection: AbstractConnection, queue: str, *, prefetch: int
    ) -> Subscription:
        """A new channel on ``connection`` with ``prefetch``, not consuming yet."""
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch)
        underlay = await channel.get_underlay_channel()
        return cls(queue, channel, Acker(underlay, queue), underlay)

    async def consume(self, deliver: OnDelivery) -> None:
        """Start consuming; each delivery goes to ``deliver``.

        The fast path takes the deliveries off the channel's frame queue; where
        it cannot attach (logged), the consumer's callback takes them.
        """

        async def on_message(message: Incoming) -> None:
            deliver(message)

        self._on_message = on_message
        attach_deliveries(self._underlay, deliver, queue=self.queue)
        await self._subscribe()
        await hint_competitors(self.channel, self.queue)

    async def _subscribe(self) -> str:
        ok = await self._underlay.basic_consume(self.queue, self._on_message)
        assert ok.consumer_tag is not None
        self.tag = ok.consumer_tag
        return self.tag

    @property
    def closed(self) -> bool:
        return self.channel.is_closed

    @property
    def cancelled(self) -> bool:
        """Whether the broker ended this subscription on its own (a queue deleted or
        moved, a node reset): aiormq forgets such a consumer without a word."""
        return self.tag not in getattr(self._underlay, "consumers", (self.tag,))

    async def resubscribe(self) -> None:
        """Consume the queue again on the same channel (raises if the channel refuses)."""
        await self._subscribe()

    async def raise_prefetch(self, prefetch: int) -> None:
        """Subscribe again with ``prefetch``, then end the old subscription.

        RabbitMQ applies a quorum queue's prefetch per consumer, when it
        subscribes. Deliveries of the old subscription still in flight are
        handled as usual.
        """
        old = self.tag
        await self._underlay.basic_qos(prefetch_count=prefetch)
        await self._subscribe()
        await self._underlay.basic_cancel(old)

    async def cancel(self) -> None:
        """Stop the deliveries (those in flight still arrive and are settled)."""
        await self._underlay.basic_cancel(self.tag)

    async def close(self) -> None:
        """Flush the acks still queued."""
        await self.acker.close()


def delivery_of(listener: Listener, message: Incoming) -> Delivery:
    """The broker-free :class:`Delivery` of ``message`` for ``listener``'s processor."""
    props = message.header.properties
    undecodable, raw_properties = problems_of(message)
    return Delivery.create(
        listener,
        message.body,
        event_name=props.message_type or message.routing_key or "",
        message_id=props.message_id,
        headers=props.headers,
        correlation_id=props.correlation_id,
        content_type=props.content_type,
        content_encoding=props.content_encoding,
        app_id=props.app_id,
        timestamp=props.timestamp,
        redelivered=bool(message.redelivered),
        undecodable=undecodable,
        raw_properties=raw_properties,
    )
