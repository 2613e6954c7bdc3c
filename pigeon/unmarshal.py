"""Moved to :mod:`pigeon.amqp.unmarshal`; this path keeps working for one release."""

from pigeon.amqp.unmarshal import (
    UndecodableHeader,
    install,
    problems_of,
    unmarshal,
)

__all__ = [
    "UndecodableHeader",
    "install",
    "problems_of",
    "unmarshal",
]
