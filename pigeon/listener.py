"""Moved to :mod:`pigeon.core.listener`; this path keeps working for one release."""

from pigeon.core.listener import (
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    SHAPES,
    AnyMiddleware,
    Context,
    Fallback,
    Handler,
    Listener,
    ListenerApp,
    TransactionalOutbox,
    check_fallback,
    default_listener_name,
    inspect_handler,
    pattern_of,
)

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_TIMEOUT",
    "SHAPES",
    "AnyMiddleware",
    "Context",
    "Fallback",
    "Handler",
    "Listener",
    "ListenerApp",
    "TransactionalOutbox",
    "check_fallback",
    "default_listener_name",
    "inspect_handler",
    "pattern_of",
]
