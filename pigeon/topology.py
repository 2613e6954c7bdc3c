"""Moved to :mod:`pigeon.core.topology` and :mod:`pigeon.amqp.declaring`; this path keeps working for one release."""

from pigeon.amqp.declaring import (
    declare,
    explain_mismatch,
)
from pigeon.core.topology import (
    DEFAULT_DELIVERY_LIMIT,
    GROUP_SIZE,
    Binding,
    ExchangeSpec,
    QueueSpec,
    Topology,
    core_topology,
    listener_queue,
    matches,
    retry_tier,
)

__all__ = [
    "DEFAULT_DELIVERY_LIMIT",
    "GROUP_SIZE",
    "Binding",
    "ExchangeSpec",
    "QueueSpec",
    "Topology",
    "core_topology",
    "declare",
    "explain_mismatch",
    "listener_queue",
    "matches",
    "retry_tier",
]
