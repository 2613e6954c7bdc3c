"""Publishes on one confirm channel: encoded by :mod:`pigeon.amqp.frames`, written once per loop turn.

aiormq's ``basic_publish`` costs, for every message, a wait on the
channel lock, a generic pamqp marshal of three frames, one slot of the
connection's ten-slot write queue and one ``send()`` system call. With 256
publishes in flight, the queue is full most of the time and every publisher
queues on the lock. That was most of the CPU time of a confirmed dispatch.

A :class:`Publishes` encodes the frames of a publish itself (the method frame
is cached per exchange and routing key; the properties are the fixed set the
wire format defines), takes the next delivery tag at once, and writes
everything published during one loop turn as one payload. The broker sees the
same frames in the same order, so what it confirms is unchanged: the
confirmation futures are aiormq's own, registered where its reader resolves
them (acks, nacks) and rejected when the channel closes. Returns of
mandatory messages are matched here, by message id, exchange and routing
key; two mandatory publishes that agree on all three are never in flight
together (the second waits for the first's answer), since a return could
not tell them apart.

The channel must be used for publishing only through its :class:`Publishes`:
delivery tags are numbered in the order messages reach the broker, and a
publish through aiormq between a tag taken here and the payload written would
break that order.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.exceptions import ChannelInvalidStateError, PublishError
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.channel import Returning
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from pigeon.amqp.frames import Intercepted, TurnWriter, content, publish_method
from pigeon.logs import get_logger

if TYPE_CHECKING:
    from pigeon.core.messages import Outgoing

log = get_logger("pigeon")

METHOD_CACHE = 1024
"""Method frames kept per channel: one per (exchange, routing key, mandatory)."""


class Publishes:
    """The publishes of one aiormq confirm channel; create it on the loop that publishes."""

    __slots__ = (
        "_closed",
        "_held",
        "_loop",
        "_methods",
        "_pending",
        "_returnable",
        "_waiting",
        "_writer",
        "channel",
    )

    def __init__(self, channel: aiormq.Channel) -> None:
        if not channel.publisher_confirms:
            raise ValueError("Publishes needs a channel in confirm mode")
        self.channel = channel
        self._loop = asyncio.get_running_loop()
        self._methods: dict[tuple[str, str, bool], bytes] = {}
        self._pending: list[bytes] = []
        self._waiting: list[asyncio.Future[Any]] = []  # their confirmations
        self._writer = TurnWriter(channel, self._put)
        self._closed = False
        # the tag of the mandatory publish in flight, by what a return shows of it
        self._returnable: dict[tuple[str, str, str], int] = {}
        # mandatory publishes waiting for one with the same id, exchange and key to be answered
        self._held: dict[tuple[str, str, str], deque[tuple[Outgoing, asyncio.Future[Any]]]] = {}
        Intercepted(channel, Basic.Return, self._returned)

    @property
    def usable(self) -> bool:
        """Whether a publish can still go to this channel.

        aiormq marks a channel closed only once it processed the close; its
        connection forgets the channel number as soon as the broker's close
        arrives. Frames sent in between would reach a channel number the
        broker no longer knows, and RabbitMQ closes the whole connection for that.
        """
        channel = self.channel
        return (
            not self._closed
            and not channel.is_closed
            and channel.connection.channels.get(channel.number) is channel
        )

    def close(self) -> None:
        """Send nothing more: what is not written yet fails (to be retried elsewhere)."""
        self._closed = True
        if self._writer.idle:
            self._put()

    def send(self, out: Outgoing) -> asyncio.Future[Any]:
        """Publish ``out`` with the next write; the future is the broker's answer.

        It resolves to ``Basic.Ack`` or to a returned message (unroutable, for
        ``mandatory``), or fails with ``DeliveryError`` (a nack) or the error
        that closed the channel. Raises at once, before anything is sent, when
        ``out`` cannot be encoded or the channel is closed.
        """
        channel = self.channel
        key = (out.exchange, out.routing_key, out.mandatory)
        method = self._methods.get(key)
        if method is None:
            if len(self._methods) >= METHOD_CACHE:
                self._methods.clear()
            method = publish_method(
                channel.number, out.exchange, out.routing_key, mandatory=out.mandatory
            )
            self._methods[key] = method
        if out.mandatory:
            if not out.message_id:  # a return is matched to its publish by id
                out = replace(out, message_id=uuid.uuid4().hex)
            returnable = (out.message_id, out.exchange, out.routing_key)
            if returnable in self._returnable:
                return self._hold(returnable, out)
        data = content(channel.number, out, channel.max_content_size)
        if not self.usable:
            raise ChannelInvalidStateError(f"channel {channel.number} is closed")
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirmation = channel.create_future()
        channel.confirmations[tag] = confirmation
        self._pending.append(method)
        self._pending.append(data)
        self._waiting.append(confirmation)
        self._writer.schedule()
        if not out.mandatory:
            return confirmation
        # The caller gets a future of its own: cancelling it (a timeout) must not end
        # the publish here, which stays the one a return of its key belongs to.
        self._expect_return(confirmation, tag, returnable)
        answer: asyncio.Future[Any] = self._loop.create_future()
        _chain(confirmation, answer)
        return answer

    def _expect_return(
        self, confirmation: asyncio.Future[Any], tag: int, key: tuple[str, str, str]
    ) -> None:
        self._returnable[key] = tag

        def answered(_: object) -> None:
            if self._returnable.get(key) == tag:
                del self._returnable[key]
                self._release(key)

        confirmation.add_done_callback(answered)

    def _hold(self, key: tuple[str, str, str], out: Outgoing) -> asyncio.Future[Any]:
        """Send ``out`` once the mandatory publish in flight with the same id, exchange
        and routing key is answered: a return could not tell the two apart."""
        answer: asyncio.Future[Any] = self._loop.create_future()
        self._held.setdefault(key, deque()).append((out, answer))
        return answer

    def _release(self, key: tuple[str, str, str]) -> None:
        held = self._held.get(key)
        while held:
            out, answer = held.popleft()
            if not held:
                del self._held[key]
            if answer.done():
                continue  # its caller gave up waiting
            try:
                _chain(self.send(out), answer)
            except Exception as exc:  # the channel closed meanwhile: retried elsewhere
                answer.set_exception(exc)
                continue
            return

    def _returned(self, frame: Basic.Return, header: ContentHeader, body: bytes) -> None:
        """A mandatory message came back unroutable: fail its publish.

        Found by the returned message's id, exchange and routing key, of which
        only one publish is in flight at a time. (aiormq matches by id alone,
        which misattributes a return when two publishes in flight share an
        id, as retry copies of one event for two listeners do.)
        """
        channel = self.channel
        key = (header.properties.message_id or "", frame.exchange or "", frame.routing_key or "")
        tag = self._returnable.get(key, 0)  # delivery tags start at 1
        confirmation = channel.confirmations.get(tag)
        if confirmation is None or confirmation.done() or isinstance(confirmation, Returning):
            log.error(
                "publish.return_unmatched",
                message_id=key[0],
                exchange=frame.exchange,
                routing_key=frame.routing_key,
                note="returned for no publish waiting on this channel",
            )
            return
        channel.confirmations[tag] = Returning()  # aiormq then ignores the ack that follows
        confirmation.set_exception(
            PublishError(DeliveredMessage(frame, header, body, channel), frame)
        )

    def _put(self) -> None:
        """Queue what is pending as one payload; call it only when the write queue has room."""
        pending, waiting = self._pending, self._waiting
        if not pending:
            return
        self._pending, self._waiting = [], []
        channel = self.channel
        if not self.usable:  # its number may be reused: never write old frames to it
            error = ChannelInvalidStateError(f"channel {channel.number} closed before the write")
            for confirmation in waiting:
                if not confirmation.done():
                    confirmation.set_exception(error)
            return
        channel.connection.write_queue.put_nowait(
            ChannelFrame(payload=b"".join(pending), should_close=False)
        )


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """Settle ``target`` as ``source`` settles (unless ``target`` was settled first)."""

    def copy(done: asyncio.Future[Any]) -> None:
        if done.cancelled():
            if not target.done():
                target.cancel()
            return
        error = done.exception()  # retrieved even when nobody waits any more
        if target.done():
            return
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)
