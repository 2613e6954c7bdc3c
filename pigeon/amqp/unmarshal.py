"""Reading frames defensively: one message's bytes never take a connection down.

pamqp decodes every short string and field-table key as UTF-8, and raises
when one is not; aiormq decodes frames inside its connection reader, where
that exception closes the whole connection. A single hostile message (a
header key or ``message_id`` that is not UTF-8, a routing key of raw bytes)
would then drop the worker's connection on every redelivery.

:func:`unmarshal` is what aiormq's reader calls instead (see
:func:`install`). It tries pamqp first; when a content header or a
``basic.deliver`` fails to decode it decodes them again leniently, property
by property, keeping what is readable and naming what is not. The result is
an :class:`UndecodableHeader` or a ``basic.deliver`` whose problems
:func:`problems_of` finds again, which the worker turns into a dead letter with ``x-pigeon-reason: undecodable``. Any other
frame that fails to decode is a protocol error and still closes the
connection, as before.
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from typing import Any

import aiormq.connection
import pamqp
import pamqp.frame
from aiormq.abc import DeliveredMessage
from pamqp import decode
from pamqp.commands import Basic
from pamqp.constants import FRAME_HEADER, FRAME_HEADER_SIZE, FRAME_METHOD
from pamqp.header import ContentHeader

from pigeon.logs import get_logger

log = get_logger("pigeon")

_pamqp_unmarshal = pamqp.frame.unmarshal
_DELIVER_INDEX = struct.pack(">HH", 60, 60)
_GET_OK_INDEX = struct.pack(">HH", 60, 71)
_STRING_TYPES = ("shortstr",)
_FIXED = {"octet": 1, "timestamp": 8, "short": 2, "long": 4, "longlong": 8}


class UndecodableHeader(ContentHeader):
    """A content header pamqp could not decode.

    ``properties`` holds every property that could be read; a string that is
    not UTF-8 is kept with its bad bytes backslash-escaped. ``problems`` names
    each property or header that could not be decoded, ``raw`` is the frame's
    undecoded property bytes.
    """

    def __init__(
        self, body_size: int, properties: Basic.Properties, problems: list[str], raw: bytes
    ):
        super().__init__(0, body_size, properties)
        self.problems = problems
        self.raw = raw


_MAX_REMEMBERED = 256
_deliver_problems: OrderedDict[int, tuple[Basic.Deliver, list[str]]] = OrderedDict()
"""What could not be decoded of recent ``basic.deliver`` frames, by ``id``: aiormq
dispatches method frames by their exact type, so a subclass cannot carry it. The
frame itself is held, so its id cannot be reused while it is here; bounded, for
deliveries on channels nobody asks about."""


def problems_of(message: DeliveredMessage) -> tuple[list[str], bytes]:
    """What could not be decoded of ``message`` (empty when all of it could) and the raw
    property bytes of its content header (empty when that header decoded)."""
    problems: list[str] = []
    if _deliver_problems:
        entry = _deliver_problems.pop(id(message.delivery), None)
        if entry is not None and entry[0] is message.delivery:
            problems = list(entry[1])
    header = message.header
    if isinstance(header, UndecodableHeader):
        return problems + header.problems, header.raw
    return problems, b""


def unmarshal(data: bytes) -> tuple[int, int, Any]:
    """pamqp's ``frame.unmarshal``, except that a content header or ``basic.deliver``
    that does not decode is decoded leniently rather than raising."""
    try:
        return _pamqp_unmarshal(data)
    except Exception as exc:
        kind, channel, size = pamqp.frame.frame_parts(data)
        end = FRAME_HEADER_SIZE + (size or 0)
        if (
            size is None
            or kind not in (FRAME_HEADER, FRAME_METHOD)
            or data[end : end + 1] != b"\xce"
        ):
            raise
        payload = data[FRAME_HEADER_SIZE:end]
        problems: list[str] = []
        if kind == FRAME_HEADER:
            frame: Any = _lenient_header(payload, problems)
        elif payload[:4] == _DELIVER_INDEX:
            frame = _lenient_deliver(payload[4:], problems)
            _deliver_problems[id(frame)] = (frame, problems)
            while len(_deliver_problems) > _MAX_REMEMBERED:
                _deliver_problems.popitem(last=False)
        elif payload[:4] == _GET_OK_INDEX:
            frame = _lenient_get_ok(payload[4:], problems)
        else:
            raise
        log.warning(
            "frames.undecodable",
            channel=channel,
            problems=problems,
            error=repr(exc),
            note="the message is dead-lettered as undecodable",
        )
        return end + 1, channel, frame


def _text(raw: bytes, what: str, problems: list[str]) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        problems.append(f"{what} {raw!r} is not UTF-8")
        # escaped, it may outgrow a short string: cut so a copy can carry it
        return raw.decode("utf-8", "backslashreplace").encode()[:255].decode("utf-8", "ignore")


def _short(data: bytes, offset: int, what: str, problems: list[str]) -> tuple[int, str]:
    length = data[offset]
    end = offset + 1 + length
    if end > len(data):
        raise ValueError(f"{what} runs past the end of the frame")
    return end, _text(data[offset + 1 : end], what, problems)


def _lenient_deliver(data: bytes, problems: list[str]) -> Basic.Deliver:
    offset, consumer_tag = _short(data, 0, "consumer tag", problems)
    (delivery_tag,) = struct.unpack_from(">Q", data, offset)
    redelivered = bool(data[offset + 8] & 1)
    offset, exchange = _short(data, offset + 9, "exchange", problems)
    _, routing_key = _short(data, offset, "routing key", problems)
    return Basic.Deliver(
        consumer_tag=consumer_tag,
        delivery_tag=delivery_tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
    )


def _lenient_get_ok(data: bytes, problems: list[str]) -> Basic.GetOk:
    (delivery_tag,) = struct.unpack_from(">Q", data, 0)
    redelivered = bool(data[8] & 1)
    offset, exchange = _short(data, 9, "exchange", problems)
    offset, routing_key = _short(data, offset, "routing key", problems)
    (message_count,) = struct.unpack_from(">I", data, offset)
    return Basic.GetOk(
        delivery_tag=delivery_tag,
        redelivered=redelivered,
        exchange=exchange,
        routing_key=routing_key,
        message_count=message_count,
    )


def _lenient_header(payload: bytes, problems: list[str]) -> UndecodableHeader:
    """Each property on its own: a failure skips that property (its length is known)."""
    _, _, body_size, flags = struct.unpack_from(">HHQH", payload)
    raw = payload[14:]
    properties = Basic.Properties()
    offset = 0
    try:
        for name in properties.__slots__:
            if not flags & properties.flags[name]:
                continue
            kind = getattr(Basic.Properties, "_" + name)
            offset = _property(properties, name, kind, raw, offset, problems)
    except (ValueError, IndexError, struct.error) as exc:
        problems.append(f"properties from byte {offset} on are unreadable: {exc}")
    return UndecodableHeader(body_size, properties, problems, raw)


def _property(
    properties: Basic.Properties, name: str, kind: str, raw: bytes, offset: int, problems: list[str]
) -> int:
    """Decode property ``name`` at ``offset`` into ``properties``; the offset after it."""
    if kind in _STRING_TYPES:
        end, text = _short(raw, offset, name, problems)
        setattr(properties, name, text)
        return end
    if kind == "table":
        length: int = struct.unpack_from(">I", raw, offset)[0]
        end = offset + 4 + length
        properties.headers = _lenient_table(raw[offset:end], problems)
        return end
    end = offset + _FIXED[kind]
    try:
        _, value = decode.by_type(raw[offset:end], kind)
    except Exception as exc:
        problems.append(f"{name} is unreadable: {exc!r}")
    else:
        setattr(properties, name, value)
    return end


def _lenient_table(table: bytes, problems: list[str]) -> dict[str, Any]:
    """A field table whose keys (or values) may not decode: keep every entry that does.

    A value that does not decode ends the table (the next entry's start is
    unknown); the entries before it are kept.
    """
    out: dict[str, Any] = {}
    offset, end = 4, len(table)
    while offset < end:
        offset, key = _short(table, offset, "header key", problems)
        try:
            consumed, value = decode.embedded_value(table[offset:])
        except Exception as exc:
            problems.append(f"header {key!r} has an unreadable value ({exc!r}); later headers lost")
            break
        offset += consumed
        out[key] = value
    return out


class _FrameView:
    """``pamqp.frame`` as aiormq's connection module sees it: :func:`unmarshal` swapped in."""

    unmarshal = staticmethod(unmarshal)

    def __getattr__(self, name: str) -> Any:
        return getattr(pamqp.frame, name)


class _PamqpView:
    frame = _FrameView()

    def __getattr__(self, name: str) -> Any:
        return getattr(pamqp, name)


def install() -> None:
    """Make aiormq's connection reader decode through :func:`unmarshal` (idempotent).

    Only aiormq's ``connection`` module sees the change; pamqp itself is untouched.
    """
    module: Any = aiormq.connection
    if not isinstance(module.pamqp, _PamqpView):
        module.pamqp = _PamqpView()
