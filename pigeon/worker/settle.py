"""Telling the broker what became of a message: ack, retry copy or dead letter.

The order is the guarantee: a retry copy or a dead letter is published and
confirmed *before* the original is acked, so a crash in between leaves a
duplicate (which idempotency absorbs), never a loss. The acks themselves go
through the consumer channel's :class:`~pigeon.amqp.acks.Acker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aio_pika.exceptions import PublishError

from pigeon import headers as h
from pigeon.amqp import Acker, declare
from pigeon.app import Pigeon, Runtime
from pigeon.core.listener import Listener
from pigeon.core.messages import Outgoing
from pigeon.core.processor import Delivery, Outcome, OutcomeKind
from pigeon.core.topology import Topology, retry_tier
from pigeon.errors import DispatchError
from pigeon.logs import get_logger
from pigeon.retry import tier_queue
from pigeon.tables import MAX_HEADER_BYTES, normalise_headers

log = get_logger("pigeon")

SETTLE_TIMEOUT = 10.0
"""Seconds a retry copy or dead letter may take to be confirmed before the original
is handed back to the broker instead (it is redelivered later)."""


def _encodable(headers: dict[str, Any], delivery: Delivery) -> dict[str, Any]:
    """``headers`` without what AMQP cannot encode, which ``x-pigeon-dropped-headers`` names.

    A message from another client can carry values Pigeon can read but not
    send again (or headers that grew past a frame with the dead-letter ones);
    without this its retry copy or dead letter could never be published.
    """
    out, dropped = normalise_headers(headers, max_bytes=MAX_HEADER_BYTES)
    if dropped:
        log.warning(
            "message.headers_dropped",
            queue=delivery.listener.queue,
            message_id=delivery.message_id,
            dropped=dropped,
        )
        earlier = out.get(h.DROPPED_HEADERS)
        names = earlier.split(",") if isinstance(earlier, str) and earlier else []
        names += [key for key in dropped if key not in names]  # a retry copy's drops stay named
        out[h.DROPPED_HEADERS] = ",".join(names)[:4096]
    return out


def login(connection: Any) -> str | None:
    """The user the connection authenticated as, which RabbitMQ checks a ``user_id``
    against: a dead letter carrying it is known to come from that user. ``None`` with
    EXTERNAL (certificate) authentication, where the name is not in the URL."""
    url = getattr(connection, "url", None)
    if url is None or str(url.query.get("auth", "")).lower() == "external":
        return None
    return str(url.user or "guest")


async def _record_outcome(delivery: Delivery, outcome: Outcome) -> None:
    """Record in the idempotency store that this try is finished, before the ack.

    The retry copy or dead letter is confirmed by now; if the process dies
    before the ack, the broker redelivers the original, and the processor
    finds the outcome here and acks it without running the handler (or the
    fallback) again. A failure to record only reopens that window: logged.
    """
    store = delivery.store
    if store is None or not delivery.listener.idempotent or not delivery.has_message_id:
        return
    settled = outcome.attempt - 1 if outcome.kind is OutcomeKind.RETRIED else outcome.attempt
    try:
        await store.record_outcome(delivery.key, settled)
    except Exception as exc:
        log.error("idempotency.store_failed", key=delivery.key, error=repr(exc), settled=settled)


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
                await declare(connection, self.app.topology([delivery.listener]))
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
        if outcome.kind is not OutcomeKind.ACKED and outcome.kind is not OutcomeKind.DUPLICATE:
            await _record_outcome(delivery, outcome)
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
            await declare(
                connection,
                Topology(
                    queues=(
                        retry_tier(
                            listener.queue,
                            outcome.delay,
                            quorum_size=self.app.settings.quorum_size,
                        ),
                    )
                ),
            )
            self._tiers.add(tier)
        headers = _encodable({**delivery.headers, h.ATTEMPT: outcome.attempt}, delivery)
        await self.runtime.publisher.publish(
            self._copy(delivery, "", tier, headers), timeout=SETTLE_TIMEOUT
        )

    async def _publish_dead_letter(self, delivery: Delivery, outcome: Outcome) -> None:
        copy = self._copy(
            delivery,
            self.app.settings.dead_letter_exchange,
            delivery.listener.queue,
            _encodable(outcome.headers, delivery),
        )
        connector = self.runtime.connector  # never connect here: the publisher retries that
        copy.user_id = login(await connector.get()) if connector.is_open else None
        await self.runtime.publisher.publish(copy, timeout=SETTLE_TIMEOUT)
