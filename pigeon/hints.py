"""Moved to :mod:`pigeon.amqp.hints`; this path keeps working for one release."""

from pigeon.amqp.hints import (
    hint_competitors,
)

__all__ = [
    "hint_competitors",
]
