"""Moved to :mod:`pigeon.worker.settle`; this path keeps working for one release."""

from pigeon.worker.settle import (
    SETTLE_TIMEOUT,
    Settler,
    login,
)

__all__ = [
    "SETTLE_TIMEOUT",
    "Settler",
    "login",
]
