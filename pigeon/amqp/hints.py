"""Hints for whoever runs the listeners: things that work but may not be what was meant."""

from __future__ import annotations

from aio_pika.abc import AbstractChannel

from pigeon.logs import get_logger

log = get_logger("pigeon")


async def hint_competitors(channel: AbstractChannel, queue: str) -> None:
    """Say so when other consumers already share ``queue``: several ``pigeon listen``
    processes of one app split its messages between them (how to scale out), which
    surprises whoever started a second one by mistake."""
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except Exception as exc:  # a hint only: never fail the start for it
        log.debug("worker.consumer_count_unknown", queue=queue, error=repr(exc))
        return
    count = declared.declaration_result.consumer_count or 0
    if count > 1:
        log.info(
            "worker.competing_consumers",
            queue=queue,
            consumers=count,
            hint="other processes consume this queue too and each message goes to one of them; "
            "stop the others if this was not meant to scale out",
        )
