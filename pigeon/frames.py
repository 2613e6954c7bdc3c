"""The hot path's frames, in and out, past aiormq's per-message machinery.

**Out.** aiormq's ``basic_publish`` costs, for every message, a wait on the
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
mandatory messages are matched here, by message id, exchange and routing key.

The channel must be used for publishing only through its :class:`Publishes`:
delivery tags are numbered in the order messages reach the broker, and a
publish through aiormq between a tag taken here and the payload written would
break that order.

**In.** aiormq passes each frame of a delivery (method, header, body)
through a queue to the channel's reader task, one wake-up per frame, then
starts a task per message only to call the consumer. :class:`Deliveries`
takes a consumer channel's frames as the connection reads them and hands a
message to the consumer, synchronously, the moment its last frame arrived;
every other frame (``consume-ok``, ``cancel``, ``close``) still goes to
aiormq's reader, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiormq
import structlog
from aio_pika.exceptions import ChannelInvalidStateError, PublishError
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.channel import Returning
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.encode import field_table
from pamqp.header import ContentHeader

if TYPE_CHECKING:
    from pigeon.dispatch import Outgoing

log = structlog.get_logger("pigeon")

ROOM_POLL = 0.001
"""Seconds between looks at a full write queue."""

FRAME_END = b"\xce"
_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_HEADER = struct.Struct(">HHQH")  # class 60, weight 0, body size, property flags
_PUBLISH = struct.Struct(">HHH")  # class 60, method 40, reserved
_TIMESTAMP = struct.Struct(">Q")
_METHOD, _CONTENT_HEADER, _BODY = 1, 2, 3

# Basic.Properties flag bits, AMQP 0-9-1 section 4.2.6.1; the order of the
# properties on the wire is the order of these bits, highest first.
CONTENT_TYPE = 1 << 15
CONTENT_ENCODING = 1 << 14
HEADERS = 1 << 13
DELIVERY_MODE = 1 << 12
CORRELATION_ID = 1 << 10
MESSAGE_ID = 1 << 7
TIMESTAMP = 1 << 6
TYPE = 1 << 5
APP_ID = 1 << 3

PERSISTENT = b"\x02"
METHOD_CACHE = 1024
"""Method frames kept per channel: one per (exchange, routing key, mandatory)."""


def short_string(value: str, what: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"{what} is {len(data)} bytes long; AMQP allows at most 255: {value!r}")
    return bytes((len(data),)) + data


def frame(kind: int, channel: int, payload: bytes) -> bytes:
    return _FRAME.pack(kind, channel, len(payload)) + payload + FRAME_END


def publish_method(channel: int, exchange: str, routing_key: str, *, mandatory: bool) -> bytes:
    """The ``basic.publish`` method frame."""
    payload = (
        _PUBLISH.pack(60, 40, 0)
        + short_string(exchange, "the exchange name")
        + short_string(routing_key, "the routing key")
        + (b"\x01" if mandatory else b"\x00")
    )
    return frame(_METHOD, channel, payload)


def properties(out: Outgoing) -> tuple[int, bytes]:
    """The property flags and list of a persistent message, as pamqp would marshal
    them (a property is left out when it is ``None`` or empty; headers never are)."""
    flags = HEADERS | DELIVERY_MODE
    parts: list[bytes] = []
    if out.content_type:
        flags |= CONTENT_TYPE
        parts.append(short_string(out.content_type, "the content type"))
    if out.content_encoding:
        flags |= CONTENT_ENCODING
        parts.append(short_string(out.content_encoding, "the content encoding"))
    parts.append(_headers(out.headers))
    parts.append(PERSISTENT)
    if out.correlation_id:
        flags |= CORRELATION_ID
        parts.append(short_string(out.correlation_id, "the correlation id"))
    if out.message_id:
        flags |= MESSAGE_ID
        parts.append(short_string(out.message_id, "the message id"))
    if out.timestamp is not None:
        flags |= TIMESTAMP
        parts.append(_TIMESTAMP.pack(int(_utc(out.timestamp).timestamp())))
    if out.event_name:
        flags |= TYPE
        parts.append(short_string(out.event_name, "the event name"))
    if out.app_id:
        flags |= APP_ID
        parts.append(short_string(out.app_id, "the app id"))
    return flags, b"".join(parts)


def _headers(headers: Mapping[str, Any]) -> bytes:
    return field_table(dict(headers)) if headers else b"\x00\x00\x00\x00"


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.utcoffset() is None else value


def content(channel: int, out: Outgoing, max_body: int) -> bytes:
    """The content header frame and the body frames (at most ``max_body`` bytes each)."""
    flags, props = properties(out)
    body = out.body
    parts = [frame(_CONTENT_HEADER, channel, _HEADER.pack(60, 0, len(body), flags) + props)]
    for start in range(0, len(body), max_body):
        parts.append(frame(_BODY, channel, body[start : start + max_body]))
    return b"".join(parts)


async def room(channel: aiormq.abc.AbstractChannel) -> None:
    """Wait until the connection's write queue (aiormq's, ten payloads) has room,
    or the channel closed.

    Polled: asyncio.Queue has no wait-for-room, and putting a payload built
    earlier could write to a channel that closed meanwhile. Rare: only while
    the socket is backed up.
    """
    while channel.connection.write_queue.full() and not channel.is_closed:  # noqa: ASYNC110
        await asyncio.sleep(ROOM_POLL)


class Publishes:
    """The publishes of one aiormq confirm channel; create it on the loop that publishes."""

    __slots__ = (
        "_closed",
        "_loop",
        "_methods",
        "_pending",
        "_returnable",
        "_scheduled",
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
        self._scheduled = False
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        # the tags of mandatory publishes still unanswered, by what a return shows of them
        self._returnable: dict[tuple[str, str, str], deque[int]] = {}
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
        if not self._scheduled and self._writer is None:
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
        if out.mandatory and not out.message_id:  # a return is matched to its publish by id
            out = replace(out, message_id=uuid.uuid4().hex)
        data = content(channel.number, out, channel.max_content_size)
        if not self.usable:
            raise ChannelInvalidStateError(f"channel {channel.number} is closed")
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirmation = channel.create_future()
        channel.confirmations[tag] = confirmation
        if out.mandatory:
            self._expect_return(confirmation, tag, (out.message_id, out.exchange, out.routing_key))
        self._pending.append(method)
        self._pending.append(data)
        self._waiting.append(confirmation)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)
        return confirmation

    def _expect_return(
        self, confirmation: asyncio.Future[Any], tag: int, key: tuple[str, str, str]
    ) -> None:
        tags = self._returnable.get(key)
        if tags is None:
            tags = self._returnable[key] = deque()
        tags.append(tag)

        def answered(_: object) -> None:
            with contextlib.suppress(ValueError):
                tags.remove(tag)
            if not tags and self._returnable.get(key) is tags:
                del self._returnable[key]

        confirmation.add_done_callback(answered)

    def _returned(self, frame: Basic.Return, header: ContentHeader, body: bytes) -> None:
        """A mandatory message came back unroutable: fail its publish.

        The broker sends the return before that message's ack, so the publish
        is the oldest unanswered one with the returned message's id, exchange
        and routing key (aiormq matches by id alone, which misattributes a
        return when two publishes in flight share an id, as retry copies of
        one event for two listeners do).
        """
        channel = self.channel
        key = (header.properties.message_id or "", frame.exchange or "", frame.routing_key or "")
        for tag in self._returnable.get(key, ()):
            confirmation = channel.confirmations.get(tag)
            if confirmation is None or confirmation.done():
                continue
            channel.confirmations[tag] = Returning()  # aiormq then ignores the ack that follows
            message = DeliveredMessage(frame, header, body, channel)
            confirmation.set_exception(PublishError(message, frame))
            return
        log.error(
            "publish.return_unmatched",
            message_id=key[0],
            exchange=frame.exchange,
            routing_key=frame.routing_key,
            note="returned for no publish waiting on this channel",
        )

    def _flush(self) -> None:
        self._scheduled = False
        if self._writer is not None:
            return  # waiting for room in the write queue; it writes this too
        channel = self.channel
        if channel.connection.write_queue.full() and not channel.is_closed:
            self._writer = asyncio.ensure_future(self._write_when_room())
            return
        self._put()

    async def _write_when_room(self) -> None:
        try:
            await room(self.channel)
            self._put()
        finally:
            self._writer = None

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


class Intercepted:
    """Takes over an aiormq channel's frame queue (the connection's reader puts every
    frame of the channel there).

    A message whose method frame is of type ``kind`` (``basic.deliver``,
    ``basic.return``) is assembled from its header and body frames and given
    to ``on_content`` the moment its last frame arrived, on the reader's own
    step: ``on_content`` must not block. Every other frame still reaches
    aiormq's channel reader, in order.
    """

    __slots__ = (
        "_body",
        "_channel",
        "_frames",
        "_header",
        "_kind",
        "_method",
        "_on_content",
        "_size",
    )

    def __init__(
        self,
        channel: aiormq.Channel,
        kind: type[Any],
        on_content: Callable[[Any, ContentHeader, bytes], None],
    ) -> None:
        frames = channel.frames
        if not isinstance(frames, asyncio.Queue):
            raise TypeError(f"channel {channel.number} has no frame queue to take over")
        self._frames: asyncio.Queue[Any] = frames
        self._channel = channel
        self._kind = kind
        self._on_content = on_content
        self._method: Any = None
        self._header: ContentHeader | None = None
        self._body: list[bytes] = []
        self._size = 0
        channel.frames = self  # type: ignore[assignment]

    async def put(self, item: tuple[int, Any]) -> None:
        """Called by the connection's reader for every frame of this channel."""
        frame = item[1]
        if self._method is None:
            if type(frame) is self._kind:
                self._method = frame
            else:
                await self._frames.put(item)
            return
        if self._header is None:
            if type(frame) is not ContentHeader:
                raise ValueError(f"expected a content header after {self._method!r}, got {frame!r}")
            self._header = frame
            if not frame.body_size:
                self._complete()
            return
        if type(frame) is not ContentBody:
            raise ValueError(f"expected a content body frame, got {frame!r}")
        self._body.append(frame.value)
        self._size += len(frame.value)
        if self._size >= self._header.body_size:
            self._complete()

    def _complete(self) -> None:
        method, header, body = self._method, self._header, self._body
        assert header is not None
        self._method, self._header, self._body, self._size = None, None, [], 0
        self._on_content(method, header, body[0] if len(body) == 1 else b"".join(body))

    # What aiormq's own channel reader calls: the frames it still handles.
    async def get(self) -> Any:
        return await self._frames.get()

    def task_done(self) -> None:
        self._frames.task_done()


class Deliveries(Intercepted):
    """Hands the deliveries of one aiormq consumer channel to ``on_message``.

    Without this, aiormq passes each frame of a delivery through a queue to
    the channel's reader task, one wake-up per frame, then starts a task per
    message only to call the consumer. A delivery for a consumer tag the
    channel no longer knows (cancelled) is dropped, as aiormq drops it; the
    broker redelivers it when the channel closes.
    """

    __slots__ = ("_on_message",)

    def __init__(
        self, channel: aiormq.Channel, on_message: Callable[[DeliveredMessage], None]
    ) -> None:
        self._on_message = on_message
        super().__init__(channel, Basic.Deliver, self._delivered)

    def _delivered(self, deliver: Basic.Deliver, header: ContentHeader, body: bytes) -> None:
        channel = self._channel
        if deliver.consumer_tag not in channel.consumers:
            log.warning(
                "message.unclaimed",
                channel=channel.number,
                consumer_tag=deliver.consumer_tag,
                delivery_tag=deliver.delivery_tag,
                note="no consumer with this tag; redelivered when the channel closes",
            )
            return
        self._on_message(DeliveredMessage(deliver, header, body, channel))
