"""Moved to :mod:`pigeon.worker.idle`; this path keeps working for one release."""

from pigeon.worker.idle import (
    POLL,
    QUIET,
    ready_messages,
)

__all__ = [
    "POLL",
    "QUIET",
    "ready_messages",
]
