"""Moved to :mod:`pigeon.amqp.acks`; this path keeps working for one release."""

from pigeon.amqp.acks import (
    CLOSE_TIMEOUT,
    Acker,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "Acker",
]
