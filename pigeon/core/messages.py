"""The messages Pigeon moves, as plain data: what goes out and what became of what came in.

A leaf: no AMQP, no app; only the other leaves (events, headers, tables), for
:func:`build_outgoing`, which turns an event into the wire format. The publisher turns an
:class:`Outgoing` into frames; the processor decides the :class:`Outcome` of a
:class:`~pigeon.core.processor.Delivery` and the worker tells the broker. The
testing toolkit builds the same objects without a broker.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict, Unpack

from pigeon import headers as h
from pigeon.events import Event, encode_payload, validate_event_name
from pigeon.tables import check_headers, short_string


class DispatchOptions(TypedDict, total=False):
    """The keywords every dispatch takes (``app.dispatch``, ``ctx.dispatch``, ``pigeon.dispatch``).

    ``message_id`` defaults to a new uuid4; ``correlation_id`` to the message
    id (``ctx.dispatch``: the handled message's correlation id);
    ``causation_id`` becomes ``x-pigeon-causation-id``; ``headers`` are sent
    as they are.
    """

    message_id: str | None
    correlation_id: str | None
    causation_id: str | None
    headers: Mapping[str, Any] | None


DISPATCH_OPTIONS = frozenset(DispatchOptions.__annotations__)


class OutboxOptions(DispatchOptions, total=False):
    """The keywords of ``outbox.dispatch``: those of every dispatch, plus ``key``.

    Events with the same ``key`` (say, the order id) are published in the
    order they were stored; the default key is the storing transaction.
    """

    key: str | None


@dataclass(slots=True)
class Outgoing:
    """A message about to be published; publish middleware may change it."""

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    event_name: str
    headers: dict[str, Any] = field(default_factory=dict)
    correlation_id: str | None = None
    app_id: str | None = None
    content_type: str = "application/json"
    content_encoding: str | None = None
    timestamp: datetime | None = None
    mandatory: bool = False
    user_id: str | None = None
    """The AMQP ``user_id``; RabbitMQ refuses a message whose user_id is not the connection's."""


class OutcomeKind(enum.StrEnum):
    ACKED = "acked"
    RETRIED = "retried"
    DEAD_LETTERED = "dead_lettered"
    DUPLICATE = "duplicate"


@dataclass(slots=True)
class Outcome:
    """What happened to a delivery, and what the broker must be told."""

    kind: OutcomeKind
    attempt: int
    delay: float | None = None
    reason: str | None = None
    error: BaseException | None = None
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def acked(self) -> bool:
        return self.kind in (OutcomeKind.ACKED, OutcomeKind.DUPLICATE)

    @property
    def retried(self) -> bool:
        return self.kind is OutcomeKind.RETRIED

    @property
    def dead_lettered(self) -> bool:
        return self.kind is OutcomeKind.DEAD_LETTERED


def build_outgoing(
    exchange: str,
    service: str | None,
    event: Event | str,
    payload: Mapping[str, Any] | None,
    **options: Unpack[DispatchOptions],
) -> Outgoing:
    """Turn a typed event or a name + payload into the documented wire format.

    ``service`` is the ``app_id``. Raises ``TypeError`` for a keyword that is
    not one of :class:`~pigeon.core.messages.DispatchOptions`.
    """
    unknown = options.keys() - DISPATCH_OPTIONS
    if unknown:
        raise TypeError(
            f"dispatch() got unexpected keyword arguments {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(sorted(DISPATCH_OPTIONS))}"
        )
    if isinstance(event, Event):
        if payload is not None:
            raise TypeError("dispatch(event) takes no payload: the event is the payload")
        name = type(event).event_name()
        body = event.to_json()
        version: int | None = type(event).__event_version__
    else:
        name = validate_event_name(event)
        body = encode_payload(payload if payload is not None else {})
        version = None
    message_id = options.get("message_id") or str(uuid.uuid4())
    if len(message_id) > 63:  # 4 bytes a character at most: 63 always fit in 255
        short_string(message_id, "the message id")  # else the correlation id is blamed
    out_headers = check_headers(options.get("headers"))
    causation_id = options.get("causation_id")
    if causation_id:
        out_headers[h.CAUSATION_ID] = causation_id
    if version is not None:
        out_headers.setdefault(h.EVENT_VERSION, version)
    return Outgoing(
        exchange=exchange,
        routing_key=name,
        body=body,
        message_id=message_id,
        event_name=name,
        headers=out_headers,
        correlation_id=options.get("correlation_id") or message_id,
        app_id=service,
        timestamp=datetime.now(UTC),
    )
