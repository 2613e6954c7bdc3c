"""Declaring a :class:`~pigeon.core.topology.Topology` on the broker.

The specs are plain data in :mod:`pigeon.core.topology`; this module sends them
and turns RabbitMQ's PRECONDITION_FAILED into a :class:`TopologyError` that
names the fix.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelPreconditionFailed

from pigeon.core.topology import GROUP_SIZE, QueueSpec, Topology
from pigeon.errors import TopologyError
from pigeon.logs import get_logger

log = get_logger("pigeon")


async def declare(channel_source: aio_pika.abc.AbstractConnection, topology: Topology) -> None:
    """Declare ``topology`` on a short-lived channel of ``channel_source``.

    Raises :class:`TopologyError` when an existing exchange or queue was
    declared with other arguments; the message names the argument and the fix.
    An existing queue's ``x-quorum-initial-group-size`` is kept (see
    :func:`_declare_queue`).
    """
    channels = [await channel_source.channel(publisher_confirms=False)]
    try:
        for ex in topology.exchanges:
            await _guard(
                ex.name,
                "exchange",
                ex.arguments,
                channels[-1].declare_exchange(
                    ex.name, ex.type, durable=True, arguments=dict(ex.arguments)
                ),
            )
        for q in topology.queues:
            queue = await _declare_queue(channel_source, channels, q)
            for b in q.bindings:
                await queue.bind(b.exchange, b.routing_key)
    finally:
        for channel in channels:
            if not channel.is_closed:
                await channel.close()


async def _declare_queue(
    channel_source: aio_pika.abc.AbstractConnection, channels: list[AbstractChannel], q: QueueSpec
) -> Any:
    """Declare ``q`` on ``channels[-1]``; an existing queue keeps its initial group size.

    RabbitMQ checks ``x-quorum-initial-group-size`` for equivalence although it
    only matters when the queue is created: a queue made before
    ``PIGEON_QUORUM_SIZE`` was set (or changed) would refuse every later
    declaration. Such a queue is declared again, on a new channel (the broker
    closed the old one), with the size it has; other differences still raise.
    """
    try:
        return await channels[-1].declare_queue(q.name, durable=True, arguments=dict(q.arguments))
    except ChannelPreconditionFailed as exc:
        kept = _keep_group_size(q.arguments, str(exc))
        if kept is None:
            raise explain_mismatch("queue", q.name, q.arguments, str(exc)) from exc
    log.info("topology.group_size_kept", queue=q.name, wanted=q.arguments.get(GROUP_SIZE))
    channels.append(await channel_source.channel(publisher_confirms=False))
    return await _guard(
        q.name, "queue", kept, channels[-1].declare_queue(q.name, durable=True, arguments=kept)
    )


def _keep_group_size(wanted: Mapping[str, Any], detail: str) -> dict[str, Any] | None:
    """``wanted`` with the existing queue's group size, if that was the only objection."""
    match = _MISMATCH.search(detail)
    if match is None or match["arg"] != GROUP_SIZE:
        return None
    kept = {k: v for k, v in wanted.items() if k != GROUP_SIZE}
    if match["current"] != "none":
        kept[GROUP_SIZE] = int(match["current"])
    return kept


async def _guard(name: str, kind: str, wanted: Mapping[str, Any], declaring: Any) -> Any:
    try:
        return await declaring
    except ChannelPreconditionFailed as exc:
        raise explain_mismatch(kind, name, wanted, str(exc)) from exc


_MISMATCH = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?:queue|exchange) '[^']*' in vhost '[^']*': "
    r"received (?:the value )?'?(?P<received>[^']*?)'?(?: of type '\w+')? "
    r"but current is (?:the value )?'?(?P<current>[^']*?)'?(?: of type '\w+')?$"
)


def explain_mismatch(kind: str, name: str, wanted: Mapping[str, Any], detail: str) -> TopologyError:
    """Turn RabbitMQ's PRECONDITION_FAILED text into an error that carries the fix."""
    match = _MISMATCH.search(detail)
    if match is None:
        return TopologyError(f"{kind} {name} exists with other arguments ({detail}).")
    arg, current = match["arg"], match["current"]
    want = wanted.get(arg, match["received"])
    have = "no value" if current == "none" else current
    deletion = f"rabbitmqctl delete_queue {name}" if kind == "queue" else f"delete exchange {name}"
    return TopologyError(
        f"{kind} {name} exists with {arg}={have}; this app wants {arg}={want}. "
        f"Drain and delete the {kind} ({deletion}) so it is declared anew, "
        f"or configure the app to match the existing {kind} (see docs/topology.md)."
    )
