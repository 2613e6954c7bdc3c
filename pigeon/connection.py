"""Moved to :mod:`pigeon.amqp.connection`; this path keeps working for one release."""

from pigeon.amqp.connection import (
    CLUSTER_HEARTBEAT,
    CONNECT_ERRORS,
    CONNECT_TIMEOUT,
    NEXT_NODE_AFTER,
    Connector,
    OnConnect,
    refusal,
)

__all__ = [
    "CLUSTER_HEARTBEAT",
    "CONNECT_ERRORS",
    "CONNECT_TIMEOUT",
    "NEXT_NODE_AFTER",
    "Connector",
    "OnConnect",
    "refusal",
]
