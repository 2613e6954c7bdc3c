"""Read a dead letter off the wire: pigeon's ``x-pigeon-*`` headers or RabbitMQ's ``x-death``.

A letter dead-lettered by a pigeon listener says exactly what failed. One
dead-lettered by RabbitMQ itself (a crash loop hitting ``x-delivery-limit``,
a plain consumer's ``nack(requeue=False)``, a TTL or a length limit) only has
``x-death``; one from a publisher that knows neither has its routing key.
:func:`read` understands all three, so no letter is ever unreadable.

AMQP header values are richer than JSON (bytes, timestamps, decimals); they
are stored as tagged JSON (:func:`to_json`) and restored exactly for a replay
(:func:`from_json`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from pigeon import headers as h
from pigeon.tables import repair_decoded

UNROUTED = "unrouted"
UNKNOWN = "unknown"

NATIVE_REASONS = {
    "rejected": "a consumer rejected it (basic.nack/basic.reject with requeue=false)",
    "expired": "its time-to-live ran out before a consumer took it",
    "maxlen": "the queue was full (x-max-length) and dropped its oldest message",
    "delivery-limit": (
        "it was delivered more times than x-delivery-limit allows without an ack: "
        "the consumer crashed or requeued it each time"
    ),
}

FAILURE_HEADERS = frozenset(
    {
        h.REASON,
        h.EXCEPTION_TYPE,
        h.EXCEPTION_MESSAGE,
        h.TRACEBACK,
        h.ATTEMPTS,
        h.FAILED_AT,
        h.ATTEMPT,
        h.X_DEATH,
        h.X_DELIVERY_COUNT,
    }
)
"""Headers a replay must not carry: they describe the failure, not the event."""


def is_failure_header(name: str) -> bool:
    return (
        name in FAILURE_HEADERS
        or name.startswith("x-first-death-")
        or name.startswith("x-last-death-")
    )


@dataclass(slots=True)
class Received:
    """One dead letter as the collector got it, ready to be stored."""

    message_id: str
    queue: str
    exchange: str
    routing_key: str
    event: str
    service: str
    reason: str
    exception_type: str
    exception_message: str
    traceback: str
    attempts: int | None
    failed_at: datetime | None
    correlation_id: str | None
    content_type: str | None
    body: bytes
    headers: dict[str, Any]
    properties: dict[str, Any]
    source: str
    fingerprint: str
    redelivered: bool = False
    replay_of: str | None = None
    origin_problem: str = ""


def normalise_reason(reason: str) -> str:
    """RabbitMQ says ``delivery_limit``; pigeon's vocabulary says ``delivery-limit``."""
    return reason.replace("_", "-")


def _text(value: Any) -> str:
    """A header or property as text; NUL (which PostgreSQL text refuses) becomes U+FFFD."""
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).replace("\x00", "\ufffd")


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        return int(_text(value))
    except ValueError:
        return None


def _when(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = _text(value)
    if not text:
        return None
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def first_death(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The newest ``x-death`` entry (RabbitMQ puts it first), or ``{}``."""
    deaths = headers.get(h.X_DEATH)
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return dict(deaths[0])
    return {}


def read(
    message: AbstractIncomingMessage,
    *,
    events_exchange: str = "",
    unrouted_queue: str | None = None,
) -> Received:
    """Describe ``message`` taken from the dead-letter queue, or from ``unrouted_queue``.

    ``events_exchange`` is where pigeon listeners got their events from; a
    pigeon dead letter does not repeat it.
    """
    return describe(
        body=message.body,
        headers=repair_decoded(dict(message.headers or {})),  # pamqp misreads -1.5
        properties=message_properties(message),
        exchange=message.exchange or "",
        routing_key=message.routing_key or "",
        events_exchange=events_exchange,
        unrouted_queue=unrouted_queue,
        redelivered=bool(message.redelivered),
    )


@dataclass(slots=True)
class _Where:
    """Where and why a letter failed, as one of the four kinds of letter tells it."""

    reason: str
    queue: str
    exchange: str
    routing_key: str
    note: str = ""
    """The exception message to show when the letter carries none."""
    native: bool = False


def _where(
    headers: Mapping[str, Any],
    death: Mapping[str, Any],
    message_type: str,
    exchange: str,
    routing_key: str,
    events_exchange: str,
    unrouted_queue: str | None,
) -> _Where:
    """Unrouted, pigeon's own dead letter, RabbitMQ's (``x-death``), or neither."""
    if unrouted_queue is not None:
        return _Where(
            UNROUTED,
            unrouted_queue,
            exchange,
            routing_key,
            f"no queue was bound to {exchange or 'the exchange'} for {routing_key!r} "
            "when it was dispatched",
        )
    if h.REASON in headers:
        key = message_type or _first_key(death) or routing_key
        return _Where(_text(headers[h.REASON]) or UNKNOWN, routing_key, events_exchange, key)
    if death or h.X_FIRST_DEATH_REASON in headers:
        reason = normalise_reason(
            _text(death.get("reason") or headers.get(h.X_FIRST_DEATH_REASON)) or UNKNOWN
        )
        return _Where(
            reason,
            routing_key or _text(headers.get(h.X_FIRST_DEATH_QUEUE)),
            _text(death.get("exchange") or headers.get("x-first-death-exchange")),
            _first_key(death) or routing_key,
            f"RabbitMQ dead-lettered it: {_native(reason)}",
            native=True,
        )
    return _Where(
        UNKNOWN,
        routing_key,
        "",
        message_type or routing_key,
        "published straight to the dead-letter exchange, without x-pigeon-* or x-death "
        "headers; the routing key is taken as the queue",
    )


def _fingerprint(reason: str, failed_at: datetime | None, death: Mapping[str, Any]) -> str:
    """What tells one failure of a message from the next (a redelivery repeats it).

    Empty when nothing does (no failed-at, no ``x-death``): such a letter is
    never taken for a redelivery, so a new failure is never dropped.
    """
    if not failed_at and not death:
        return ""
    return "|".join(
        (
            reason,
            failed_at.isoformat() if failed_at else "",
            _text(death.get("count")),
            _text(death.get("time")),
        )
    )


def describe(
    *,
    body: bytes,
    headers: dict[str, Any],
    properties: dict[str, Any],
    exchange: str,
    routing_key: str,
    events_exchange: str = "",
    unrouted_queue: str | None = None,
    redelivered: bool = False,
) -> Received:
    """The pure part of :func:`read`: decide what failed, where, and why."""
    death = first_death(headers)
    message_type = _text(properties.get("type"))
    unrouted = unrouted_queue is not None
    where = _where(
        headers, death, message_type, exchange, routing_key, events_exchange, unrouted_queue
    )
    attempts = _int(headers.get(h.ATTEMPTS))
    failed_at = _when(headers.get(h.FAILED_AT))
    if where.native:
        attempts = attempts or _int(headers.get(h.X_DELIVERY_COUNT)) or _int(death.get("count"))
        failed_at = failed_at or _when(death.get("time"))
    queue = where.queue
    if not queue and not unrouted:
        queue = _text(headers.get(h.QUEUE)) or _text(death.get("queue"))
    service = _text(headers.get(h.SERVICE))
    if unrouted:
        service = service or _text(properties.get("app_id"))
    elif not service and "." in queue:
        service = queue.split(".", 1)[0]  # pigeon names queues {service}.{listener}
    event = message_type or where.routing_key
    return Received(
        message_id=_text(properties.get("message_id")) or _synthetic_id(queue, event, body),
        queue=queue,
        exchange=where.exchange,
        routing_key=where.routing_key,
        event=event,
        service=service,
        reason=where.reason,
        exception_type=_text(headers.get(h.EXCEPTION_TYPE)),
        exception_message=_text(headers.get(h.EXCEPTION_MESSAGE)) or where.note,
        traceback=_text(headers.get(h.TRACEBACK)),
        attempts=attempts,
        failed_at=failed_at,
        correlation_id=_text(properties.get("correlation_id")) or None,
        content_type=_text(properties.get("content_type")) or None,
        body=body,
        headers=to_json(headers),
        properties=to_json(properties),
        source=UNROUTED if unrouted else "dead-letter",
        fingerprint=_fingerprint(where.reason, failed_at, death),
        redelivered=redelivered,
        replay_of=_text(headers.get(h.REPLAY_OF)) or None,
        origin_problem="" if unrouted else origin_problem(headers, death, routing_key),
    )


def origin_problem(headers: Mapping[str, Any], death: Mapping[str, Any], routing_key: str) -> str:
    """Why the letter's origin is in doubt, or ``""``.

    The origin is the routing key the dead-letter exchange got: pigeon's
    queues dead-letter under their own name, and broker permissions can bind
    a service to writing only its own names. ``x-pigeon-queue`` and the newest
    ``x-death`` entry are claims anyone can write; where present they must
    agree (an ``x-death`` entry of one of the queue's retry tiers does: it is
    the delayed retry the message went through before it failed).
    """
    if not routing_key:
        return "origin unknown: the letter arrived without a routing key"
    claims = []
    claimed_queue = _text(headers.get(h.QUEUE))
    if h.QUEUE in headers and claimed_queue != routing_key:
        claims.append(f"x-pigeon-queue says {claimed_queue!r}")
    died_in = _text(death.get("queue"))
    if death and died_in != routing_key and not died_in.startswith(f"{routing_key}.retry."):
        claims.append(f"x-death says {died_in!r}")
    if not claims:
        return ""
    return (
        f"origin headers disagree: it was dead-lettered under {routing_key!r} but "
        + " and ".join(claims)
        + "; it is not replayed"
    )


def _native(reason: str) -> str:
    return NATIVE_REASONS.get(reason, f"reason {reason!r}")


def _first_key(death: Mapping[str, Any]) -> str:
    keys = death.get("routing-keys")
    if isinstance(keys, list | tuple) and keys:
        return _text(keys[0])
    return ""


def _synthetic_id(queue: str, event: str, body: bytes) -> str:
    """A stable id for a message published without ``message_id``: same content, same letter."""
    digest = hashlib.sha256(b"\0".join((queue.encode(), event.encode(), body))).hexdigest()
    return f"no-id-{digest[:24]}"


PROPERTY_NAMES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


def message_properties(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The AMQP basic properties that are set, by name."""
    out: dict[str, Any] = {}
    for name in PROPERTY_NAMES:
        value = getattr(message, name, None)
        if name == "delivery_mode" and value is not None:
            value = int(value)
        if value is not None and value != "":
            out[name] = value
    return out


TAGS = ("$bytes", "$datetime", "$decimal", "$float")


def _escape_key(key: Any) -> str:
    """A real table key starting with ``$`` gets one more, so it never reads as a tag."""
    text = str(key)
    return "$" + text if text.startswith("$") else text


def _unescape_key(key: str) -> str:
    return key[1:] if key.startswith("$$") else key


def to_json(value: Any) -> Any:
    """AMQP values → JSON; bytes, timestamps and decimals are tagged so they survive.

    A tag is a one-key object whose key starts with ``$``; keys of real
    tables that start with ``$`` are stored with one more ``$``, so no
    header can be mistaken for a tag.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return {"$float": str(value)}  # JSON has no NaN or infinity; PostgreSQL refuses them
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, Mapping):
        return {_escape_key(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return str(value)


def _untag(tag: str, raw: Any) -> Any:
    if tag == "$bytes":
        return base64.b64decode(raw, validate=True)
    if tag == "$datetime":
        return datetime.fromisoformat(raw)
    if tag == "$float":
        return float(raw)
    return Decimal(raw)


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`; a tag that does not decode is kept as stored."""
    if isinstance(value, dict):
        if len(value) == 1:
            ((tag, raw),) = value.items()
            if tag in TAGS:
                try:
                    return _untag(tag, raw)
                except (ValueError, TypeError, ArithmeticError):
                    return {tag: raw}  # written before keys were escaped: shown as it is
        return {_unescape_key(k): from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def display(value: Any) -> str:
    """A stored (tagged) header value as a person reads it."""
    plain = from_json(value)
    if isinstance(plain, bytes):
        return plain.decode("utf-8", "replace")
    if isinstance(plain, datetime):
        return plain.isoformat()
    if isinstance(plain, str):
        return plain
    return json.dumps(plain, ensure_ascii=False, default=str)


def is_json_type(content_type: str | None) -> bool:
    """Pigeon's rule: no content type, ``application/json`` or ``*+json`` means JSON."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def body_view(body: bytes, content_type: str | None) -> tuple[str, str]:
    """(``json`` | ``text`` | ``hex``, what to show): pretty JSON, text, or a hex dump."""
    if body[:1] in (b"{", b"[", b'"') or is_json_type(content_type):
        try:
            return "json", json.dumps(json.loads(body), indent=2, ensure_ascii=False)
        except (ValueError, RecursionError):  # not JSON, or nested too deep to pretty-print
            pass
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "hex", hexdump(body)
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "text", text
    return "hex", hexdump(body)


def hexdump(data: bytes, limit: int = 64 * 1024) -> str:
    """``offset  hex bytes  |ascii|`` lines, like ``hexdump -C``; long bodies are cut."""
    lines = []
    for offset in range(0, min(len(data), limit), 16):
        chunk = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {hexes:<47}  |{text}|")
    if len(data) > limit:
        lines.append(f"… {len(data) - limit} more bytes")
    return "\n".join(lines)
