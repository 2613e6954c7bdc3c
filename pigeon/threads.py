"""Moved to :mod:`pigeon.worker.threads`; this path keeps working for one release."""

from pigeon.worker.threads import (
    HandlerThreads,
)

__all__ = [
    "HandlerThreads",
]
