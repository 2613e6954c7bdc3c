"""Moved to :mod:`pigeon.bridge` and :mod:`pigeon.amqp.publisher` and :mod:`pigeon.core.messages`; this path keeps working for one release."""

from pigeon.amqp.publisher import (
    MIN_TRY,
    NODE_ATTEMPT_TIMEOUT,
    RETRYABLE,
    Publisher,
)
from pigeon.bridge import (
    Bridge,
    bridge,
    on_bridge_shutdown,
)
from pigeon.core.messages import (
    Outgoing,
    build_outgoing,
)

__all__ = [
    "MIN_TRY",
    "NODE_ATTEMPT_TIMEOUT",
    "RETRYABLE",
    "Bridge",
    "Outgoing",
    "Publisher",
    "bridge",
    "build_outgoing",
    "on_bridge_shutdown",
]
