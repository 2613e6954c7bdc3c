"""Moved to :mod:`pigeon.amqp.publishes`; this path keeps working for one release."""

from pigeon.amqp.publishes import (
    METHOD_CACHE,
    Publishes,
)

__all__ = [
    "METHOD_CACHE",
    "Publishes",
]
