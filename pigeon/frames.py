"""Publishes on one confirm channel: encoded here, written once per event-loop turn.

aiormq's ``basic_publish`` costs, for every message, a task-sized await on the
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
them (acks, nacks, returns of mandatory messages) and rejected when the
channel closes.

The channel must be used for publishing only through its :class:`Publishes`:
delivery tags are numbered in the order messages reach the broker, and a
publish through aiormq between a tag taken here and the payload written would
break that order.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika.exceptions import ChannelInvalidStateError
from aiormq.abc import ChannelFrame
from pamqp.encode import field_table

if TYPE_CHECKING:
    from pigeon.dispatch import Outgoing

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

    __slots__ = ("_loop", "_methods", "_pending", "_scheduled", "_waiting", "_writer", "channel")

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
        data = content(channel.number, out, channel.max_content_size)
        if channel.is_closed:
            raise ChannelInvalidStateError(f"channel {channel.number} is closed")
        channel.delivery_tag += 1
        tag = channel.delivery_tag
        confirmation = channel.create_future()
        channel.confirmations[tag] = confirmation
        if out.mandatory:  # aiormq finds a returned message's confirmation by its id
            ids = channel.message_id_delivery_tag
            message_id = out.message_id
            ids[message_id] = tag
            confirmation.add_done_callback(lambda _: ids.pop(message_id, None))
        self._pending.append(method)
        self._pending.append(data)
        self._waiting.append(confirmation)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)
        return confirmation

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
        if channel.is_closed:  # its number may be reused: never write old frames to it
            error = ChannelInvalidStateError(f"channel {channel.number} closed before the write")
            for confirmation in waiting:
                if not confirmation.done():
                    confirmation.set_exception(error)
            return
        channel.connection.write_queue.put_nowait(
            ChannelFrame(payload=b"".join(pending), should_close=False)
        )
