"""Moved to :mod:`pigeon.core.messages`; this path keeps working for one release."""

from pigeon.core.messages import (
    DISPATCH_OPTIONS,
    DispatchOptions,
    OutboxOptions,
    Outcome,
    OutcomeKind,
    Outgoing,
    build_outgoing,
)

__all__ = [
    "DISPATCH_OPTIONS",
    "DispatchOptions",
    "OutboxOptions",
    "Outcome",
    "OutcomeKind",
    "Outgoing",
    "build_outgoing",
]
