"""Moved to :mod:`pigeon.core.processor`; this path keeps working for one release."""

from pigeon.core.processor import (
    Delivery,
    HandlerTimeout,
    InvalidMessage,
    NotStarted,
    Outcome,
    OutcomeKind,
    Processor,
    Renewal,
)

__all__ = [
    "Delivery",
    "HandlerTimeout",
    "InvalidMessage",
    "NotStarted",
    "Outcome",
    "OutcomeKind",
    "Processor",
    "Renewal",
]
