"""Acks and give-backs for one consumer channel, written once per event-loop turn.

The worker settles a message only once its outcome is safe: handled and
marked done, or its retry copy or dead letter confirmed by the broker. Sending
one ``basic.ack`` per message would cost a frame, a queue hop, a write and a
syscall for each. The :class:`Acker` collects everything settled during one
turn of the event loop and writes it in a single payload:

- the run of acked delivery tags that starts at the lowest tag still
  unsettled becomes one ``basic.ack(multiple=True)``; a tag that is still
  being handled ends the run, so it is never acked by it;
- any other ack, and every give-back (``basic.nack(requeue=True)``), is a frame
  of its own;
- the frames leave in order, and one payload at a time, so a give-back always
  reaches the broker before a later ``multiple`` ack could cover its tag.

What the broker learns is unchanged; it learns it at the end of the loop
turn rather than at once. An ack lost with its connection means a
redelivery, as before, and idempotency recognizes it as a duplicate.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiormq.abc import AbstractChannel, ChannelFrame
from pamqp.commands import Basic

from pigeon.amqp.frames import TurnWriter, room
from pigeon.logs import get_logger

log = get_logger("pigeon")

CLOSE_TIMEOUT = 10.0
"""Seconds :meth:`Acker.close` waits for the last acks to be written."""


class Acker:
    """Settles the deliveries of one aiormq channel; create it on the loop that consumes."""

    __slots__ = (
        "_loop",
        "_settled",
        "_unsettled",
        "_writer",
        "channel",
        "queue",
    )

    def __init__(self, channel: AbstractChannel, queue: str) -> None:
        self.channel = channel
        self.queue = queue
        self._loop = asyncio.get_running_loop()
        self._unsettled: dict[int, None] = {}  # delivered, not yet sent; in tag order
        self._settled: dict[int, bool] = {}  # tag -> give back (True) or ack (False)
        self._writer = TurnWriter(channel, self._put)

    @property
    def unsettled(self) -> int:
        """Deliveries whose ack or give-back has not been written yet."""
        return len(self._unsettled)

    def delivered(self, tag: int) -> None:
        """Record a delivery; call it in tag order, before the message is handled."""
        self._unsettled[tag] = None

    def ack(self, tag: int) -> None:
        """The message is safely handled: ack it with the next write."""
        self._settle(tag, give_back=False)

    def give_back(self, tag: int) -> None:
        """Return the message to its queue unhandled (``basic.nack``, requeued)."""
        self._settle(tag, give_back=True)

    def _settle(self, tag: int, *, give_back: bool) -> None:
        if tag not in self._unsettled or tag in self._settled:
            return  # settled already, or delivered on an earlier channel
        self._settled[tag] = give_back
        self._writer.schedule()

    def frames(self) -> tuple[list[Any], int]:
        """The frames for everything settled so far, and how many messages they settle.

        Forgets what they settle: call it only when the frames are about to be written.
        """
        settled = self._settled
        if not settled:
            return [], 0
        count = len(settled)
        frames: list[Any] = []
        run: list[int] = []
        for tag in self._unsettled:
            if settled.get(tag) is not False:
                break
            run.append(tag)
        if len(run) > 1:
            frames.append(Basic.Ack(delivery_tag=run[-1], multiple=True))
            for tag in run:
                del settled[tag]
                del self._unsettled[tag]
        for tag, give_back in settled.items():
            del self._unsettled[tag]
            if give_back:
                frames.append(Basic.Nack(delivery_tag=tag, multiple=False, requeue=True))
            else:
                frames.append(Basic.Ack(delivery_tag=tag))
        settled.clear()
        return frames, count

    def _payload(
        self, drain: asyncio.Future[None] | None = None
    ) -> tuple[ChannelFrame | None, int]:
        """Plan and marshal what is settled; call it only when the write queue has room,
        so that the channel's state checked here is still true when the payload is queued."""
        frames, count = self.frames()
        if not frames:
            return None, 0
        if self.channel.is_closed:  # its number may be reused: never write old tags to it
            self._lost(count, "channel closed")
            return None, 0
        return ChannelFrame.marshall(self.channel.number, frames, drain_future=drain), count

    def _put(self) -> None:
        payload, _ = self._payload()
        if payload is not None:
            self.channel.connection.write_queue.put_nowait(payload)

    def _lost(self, count: int, error: str) -> None:
        log.warning(
            "message.ack_lost",
            queue=self.queue,
            count=count,
            error=error,
            note="the broker redelivers them; idempotency recognizes the duplicates",
        )

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Write what is settled and wait, up to ``timeout``, until it has left the process."""
        waiting = self._writer.waiting
        if waiting is not None:
            waiting.cancel()  # the frames it would write stay planned: written here
            await asyncio.wait({waiting})
        taken = 0  # settled by the last payload, not known to have left the process
        try:
            async with asyncio.timeout(timeout):
                await room(self.channel)
                drained: asyncio.Future[None] = self._loop.create_future()
                payload, taken = self._payload(drained)
                if payload is None:
                    return
                self.channel.connection.write_queue.put_nowait(payload)
                await drained
                return
        except TimeoutError:
            error = f"not written within {timeout:g}s"
        except Exception as exc:
            error = repr(exc)
        self._lost(len(self._settled) + taken, error)
