"""AMQP pieces the frames and publishes tests share."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pamqp.commands import Basic
from pamqp.header import ContentHeader

from pigeon.dispatch import Outgoing


def outgoing(**overrides: Any) -> Outgoing:
    values: dict[str, Any] = {
        "exchange": "shop.events",
        "routing_key": "order.placed",
        "body": b'{"order_id":"42"}',
        "message_id": "6f1c0d1e-2c7b-4d8e-9a55-3f1b9a7c0e21",
        "event_name": "order.placed",
        "headers": {"x-pigeon-version": 2, "x-causation-id": "c-1"},
        "correlation_id": "corr-42",
        "app_id": "orders",
        "timestamp": datetime(2026, 12, 2, 4, 13, 47, 512_000, tzinfo=UTC),
    }
    values.update(overrides)
    return Outgoing(**values)


def properties(out: Outgoing) -> Basic.Properties:
    """The properties of ``out`` as pamqp objects: what pamqp would marshal for it."""
    return Basic.Properties(
        content_type=out.content_type,
        content_encoding=out.content_encoding,
        headers=out.headers,
        delivery_mode=2,
        correlation_id=out.correlation_id,
        message_id=out.message_id,
        timestamp=out.timestamp,
        message_type=out.event_name,
        user_id=out.user_id,
        app_id=out.app_id,
    )


def header(size: int, message_id: str) -> ContentHeader:
    return ContentHeader(0, size, Basic.Properties(message_id=message_id))
