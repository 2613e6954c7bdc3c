"""The wire vocabulary: header names and dead-letter reasons.

Every name here is part of the documented wire format (``docs/wire-format.md``),
so services in other languages can read and write them. Changing one is a
breaking change.
"""

from __future__ import annotations

from typing import Final

CAUSATION_ID: Final = "x-pigeon-causation-id"
EVENT_VERSION: Final = "x-pigeon-event-version"
ATTEMPT: Final = "x-pigeon-attempt"
"""1-based number of the try a retry copy is for; absent means attempt 1."""

REASON: Final = "x-pigeon-reason"
EXCEPTION_TYPE: Final = "x-pigeon-exception-type"
EXCEPTION_MESSAGE: Final = "x-pigeon-exception-message"
TRACEBACK: Final = "x-pigeon-traceback"
QUEUE: Final = "x-pigeon-queue"
LISTENER: Final = "x-pigeon-listener"
ATTEMPTS: Final = "x-pigeon-attempts"
FAILED_AT: Final = "x-pigeon-failed-at"
SERVICE: Final = "x-pigeon-service"

UNDECODABLE: Final = "x-pigeon-undecodable"
"""On an ``undecodable`` dead letter: the raw bytes of the original's properties."""
DROPPED_HEADERS: Final = "x-pigeon-dropped-headers"
"""Comma-separated keys of headers left out of a copy because AMQP cannot encode them."""

REPLAY_OF: Final = "x-pigeon-replay-of"
REPLAYED_BY: Final = "x-pigeon-replayed-by"

TRACEPARENT: Final = "traceparent"

# RabbitMQ's own headers on natively dead-lettered and redelivered messages.
X_DEATH: Final = "x-death"
X_FIRST_DEATH_REASON: Final = "x-first-death-reason"
X_FIRST_DEATH_QUEUE: Final = "x-first-death-queue"
X_DELIVERY_COUNT: Final = "x-delivery-count"


class Reason:
    """Values of ``x-pigeon-reason``: why a message became a dead letter."""

    HANDLER_ERROR: Final = "handler-error"
    INVALID_PAYLOAD: Final = "invalid-payload"
    UNSUPPORTED_CONTENT_TYPE: Final = "unsupported-content-type"
    BODY_TOO_LARGE: Final = "body-too-large"
    UNKNOWN_EVENT: Final = "unknown-event"
    REJECTED: Final = "rejected"
    TIMEOUT: Final = "timeout"
    DELIVERY_LIMIT: Final = "delivery-limit"
    UNDECODABLE: Final = "undecodable"
