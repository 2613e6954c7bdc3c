"""AMQP frames on the hot path, below aiormq's per-message machinery.

**Encoding.** The frames of a ``basic.publish`` (method, content header,
body), byte for byte what pamqp marshals for the properties the wire format
defines; :mod:`pigeon.amqp.publishes` writes them.

**Taking deliveries.** aiormq passes each frame of a delivery (method,
header, body) through a queue to the channel's reader task, one wake-up per
frame, then starts a task per message only to call the consumer.
:class:`Intercepted` takes a channel's frames as the connection reads them,
assembles the messages of one kind (deliveries, returns) and hands each over
the moment its last frame arrived; every other frame (``consume-ok``,
``cancel``, ``close``, confirms) still goes to aiormq's reader, in order.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib import metadata
from typing import TYPE_CHECKING, Any, cast

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from pigeon.logs import get_logger
from pigeon.tables import encode_table, short_string

if TYPE_CHECKING:
    from pigeon.core.messages import Outgoing

log = get_logger("pigeon")

_AIORMQ_VERSION = metadata.version("aiormq")

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
USER_ID = 1 << 4
APP_ID = 1 << 3

PERSISTENT = b"\x02"


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


def check_encodable(out: Outgoing) -> None:
    """Raise (``ValueError``, ``TypeError``) what a publish of ``out`` would raise before
    sending anything: a name, id or header no AMQP frame can carry."""
    publish_method(1, out.exchange, out.routing_key, mandatory=out.mandatory)
    properties(out)


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
    if out.user_id:
        flags |= USER_ID
        parts.append(short_string(out.user_id, "the user id"))
    if out.app_id:
        flags |= APP_ID
        parts.append(short_string(out.app_id, "the app id"))
    return flags, b"".join(parts)


def _headers(headers: Mapping[str, Any]) -> bytes:
    return encode_table(headers) if headers else b"\x00\x00\x00\x00"


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


class TurnWriter:
    """Writes a channel's pending frames once per event-loop turn, in order.

    :class:`~pigeon.amqp.acks.Acker` and :class:`~pigeon.amqp.publishes.Publishes` both
    collect frames during a turn and hand them to aiormq's write queue as one
    payload. ``put()`` builds and queues that payload; it is called only when
    the queue has room (at the end of the turn, or once :func:`room` found
    some), so the channel state it checks is still true when the payload is
    queued. While a write waits for room, later turns add to what it writes.
    """

    __slots__ = ("_channel", "_loop", "_put", "_scheduled", "waiting")

    def __init__(self, channel: aiormq.abc.AbstractChannel, put: Callable[[], None]) -> None:
        self._channel = channel
        self._put = put
        self._loop = asyncio.get_running_loop()
        self._scheduled = False
        self.waiting: asyncio.Task[None] | None = None
        """The write waiting for room in the write queue, if any."""

    @property
    def idle(self) -> bool:
        """Nothing scheduled and nothing waiting for room."""
        return not self._scheduled and self.waiting is None

    def schedule(self) -> None:
        """Write at the end of this loop turn (once, however often it is called)."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self.waiting is not None:
            return  # waiting for room in the write queue; it writes this too
        channel = self._channel
        if channel.connection.write_queue.full() and not channel.is_closed:
            self.waiting = asyncio.ensure_future(self._write_when_room())
            return
        self._put()

    async def _write_when_room(self) -> None:
        try:
            await room(self._channel)
            self._put()
        finally:
            self.waiting = None


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
        """Called by the connection's reader for every frame of this channel.

        Never raises into that reader (it would take the whole connection down):
        a frame out of order drops the message it interrupted, which stays
        unacked and is redelivered when the channel closes, and an error of
        the callback is logged.
        """
        frame = item[1]
        if self._method is not None:
            if self._header is None and isinstance(frame, ContentHeader):
                self._header = frame
                if not frame.body_size:
                    self._complete()
                return
            if self._header is not None and type(frame) is ContentBody:
                self._body.append(frame.value)
                self._size += len(frame.value)
                if self._size >= self._header.body_size:
                    self._complete()
                return
            log.error(
                "frames.out_of_order",
                channel=self._channel.number,
                interrupted=repr(self._method),
                frame=repr(frame),
                note="the interrupted message is dropped; redelivered when the channel closes",
            )
            self._reset()
        if isinstance(frame, self._kind):
            self._method = frame
        else:
            await self._frames.put(item)

    def _reset(self) -> None:
        self._method, self._header, self._body, self._size = None, None, [], 0

    def _complete(self) -> None:
        method, header, body = self._method, self._header, self._body
        assert header is not None
        self._reset()
        try:
            self._on_content(method, header, body[0] if len(body) == 1 else b"".join(body))
        except Exception as exc:
            log.error(
                "frames.callback_failed",
                channel=self._channel.number,
                method=repr(method),
                error=repr(exc),
                note="not handled; a delivery is redelivered when its channel closes",
            )

    # What aiormq's own channel reader calls: the frames it still handles.
    async def get(self) -> Any:
        return await self._frames.get()

    def task_done(self) -> None:
        self._frames.task_done()


class Deliveries(Intercepted):
    """Hands the deliveries of one aiormq consumer channel to ``on_message``.

    For a channel with one consumer, as the worker's are: every delivery for
    a consumer tag the channel knows goes to the same ``on_message``. A
    delivery for a consumer tag the channel no longer knows (cancelled) is
    dropped, as aiormq drops it; the broker redelivers it when the channel
    closes.
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


def attach_deliveries(
    channel: aiormq.abc.AbstractChannel,
    on_message: Callable[[DeliveredMessage], None],
    *,
    queue: str,
) -> bool:
    """Take ``channel``'s deliveries off its frame queue: the one place the fast path attaches.

    aio-pika's per-message ``IncomingMessage`` is the costliest step of
    consuming, and aiormq adds a queue hop per frame and a task per message;
    :class:`Deliveries` skips all three. It relies on aiormq internals (the
    channel's ``frames`` queue, which the pin in pyproject.toml and
    ``tests/test_aiormq_contract.py`` guard). When it does not fit this
    aiormq, the consumer's own callback takes the deliveries instead: same
    guarantees, slower. That is logged (``worker.fast_path_unavailable``),
    never silent. Returns whether the fast path is attached.
    """
    try:
        Deliveries(cast(aiormq.Channel, channel), on_message)
    except (TypeError, AttributeError) as exc:
        log.warning(
            "worker.fast_path_unavailable",
            queue=queue,
            aiormq=_AIORMQ_VERSION,
            error=str(exc),
            note="consuming through aiormq's callback: the same guarantees, slower",
        )
        return False
    return True
