"""Telling the broker what became of a message: ack, retry copy or dead letter.

The order is the guarantee: a retry copy or a dead letter is published and
confirmed *before* the original is acked, so a crash in between leaves a
duplicate (which idempotency absorbs), never a loss. The acks themselves go
through the consumer channel's :class:`~pigeon.acks.Acker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from aio_pika.exceptions import PublishError

from pigeon import headers as h
from pigeon import topology
from pigeon.acks import Acker
from pigeon.app import Pigeon, Runtime
from pigeon.delivery import Delivery, Outcome, OutcomeKind
from pigeon.errors import DispatchError
from pigeon.listener import Listener
from pigeon.messages import Outgoing
from pigeon.retry import tier_queue

log = structlog.get_logger("pigeon")

SETTLE_TIMEOUT = 10.0
"""Seconds a retry copy or dead letter may take to be confirmed before the original
is handed back to the broker instead (it is redelivered later)."""


class Settler:
    """Settles outcomes for one connection of a worker; knows which tier queues exist."""

    def __init__(self, app: Pigeon, runtime: Runtime, listeners: Sequence[Listener]) -> None:
        self.app = app
        self.runtime = runtime
        self.generation = runtime.connector.generation
        self._tiers = {
            tier_queue(listener.queue, d)
            for listener in listeners
            for d in listener.retry.tier_delays()
        }

    @property
    def tiers(self) -> frozenset[str]:
        """The retry tier queues declared on this connection."""
        return frozenset(self._tiers)

    async def settle(self, acker: Acker, tag: int, delivery: Delivery, outcome: Outcome) -> bool:
        """Settle delivery ``tag``; a retry or dead-letter copy is confirmed before the ack.

        Returns False when the copy could not be published and the message was
        given back instead.
        """
        try:
            try:
                await self._publish_outcome(delivery, outcome)
            except DispatchError as exc:
                if not isinstance(exc.__cause__, PublishError):
                    raise
                # The tier or dead-letter queue was deleted under us: declare it again, once.
                log.warning("topology.missing", queue=delivery.listener.queue, error=str(exc))
                self._tiers.clear()
                connection = await self.runtime.connector.get()
                await topology.declare(connection, self.app.topology([delivery.listener]))
                await self._publish_outcome(delivery, outcome)
        except Exception as exc:
            log.error(
                "message.settle_failed",
                queue=delivery.listener.queue,
                message_id=delivery.message_id,
                outcome=outcome.kind.value,
                error=repr(exc),
                note="message left unacked; the broker redelivers it",
            )
            acker.give_back(tag)
            return False
        acker.ack(tag)
        return True

    async def _publish_outcome(self, delivery: Delivery, outcome: Outcome) -> None:
        if outcome.kind is OutcomeKind.RETRIED:
            await self._publish_copy(delivery, outcome)
        elif outcome.kind is OutcomeKind.DEAD_LETTERED:
            await self._publish_dead_letter(delivery, outcome)

    def _copy(
        self, delivery: Delivery, exchange: str, routing_key: str, headers: dict[str, Any]
    ) -> Outgoing:
        return Outgoing(
            exchange=exchange,
            routing_key=routing_key,
            body=delivery.body,
            message_id=delivery.message_id,
            event_name=delivery.event_name,
            headers=headers,
            correlation_id=delivery.correlation_id,
            app_id=delivery.app_id,
            content_type=delivery.content_type or "application/json",
            content_encoding=delivery.content_encoding,
            timestamp=delivery.timestamp,
            mandatory=True,
        )

    async def _publish_copy(self, delivery: Delivery, outcome: Outcome) -> None:
        assert outcome.delay is not None
        listener = delivery.listener
        tier = tier_queue(listener.queue, outcome.delay)
        if tier not in self._tiers:
            connection = await self.runtime.connector.get()
            await topology.declare(
                connection,
                topology.Topology(queues=(topology.retry_tier(listener.queue, outcome.delay),)),
            )
            self._tiers.add(tier)
        headers = {**delivery.headers, h.ATTEMPT: outcome.attempt}
        await self.runtime.publisher.publish(
            self._copy(delivery, "", tier, headers), timeout=SETTLE_TIMEOUT
        )

    async def _publish_dead_letter(self, delivery: Delivery, outcome: Outcome) -> None:
        copy = self._copy(
            delivery,
            self.app.settings.dead_letter_exchange,
            delivery.listener.queue,
            outcome.headers,
        )
        await self.runtime.publisher.publish(copy, timeout=SETTLE_TIMEOUT)
