"""The message a replay publishes, built and checked whole before anything is sent.

A stored letter keeps its header values as tagged JSON (:mod:`letterthief.parse`).
Turning them back into what pigeon's encoder takes is done here, once, for the
whole message: bytes become a byte array (``x``; RabbitMQ's decoder gave bytes
for byte arrays and for long strings that are not UTF-8), tables and arrays are
converted item by item. The message is then encoded once as a check, header by
header, so a value the encoder still refuses is reported with its key (an
:class:`Unencodable`, 422) and never reaches the channel, where a half-sent
publish would break the confirm numbering of every publish after it.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

from letterthief import parse
from letterthief.models import Letter
from pigeon import headers as h
from pigeon.amqp import frames
from pigeon.core.messages import Outgoing
from pigeon.tables import repair_decoded

MAX_CONTENT = 128 * 1024
"""Frame size used for the check encode; the real one is the channel's."""


class Unencodable(ValueError):
    """A header or property of the letter that AMQP cannot carry; names it."""


def wire_value(value: Any) -> Any:
    """A stored (decoded) header value as the AMQP encoder takes it."""
    if isinstance(value, bytes | memoryview):
        return bytearray(value)
    if isinstance(value, dict):
        return {str(k): wire_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [wire_value(v) for v in value]
    return value


def replay_headers(letter: Letter, actor: str) -> dict[str, Any]:
    """The letter's headers without those describing the failure, plus the replay marks."""
    stored = parse.from_json(letter.headers)
    if isinstance(stored, dict):
        stored = repair_decoded(stored)  # letters stored before the collector repaired them
    out = {
        k: wire_value(v)
        for k, v in (stored.items() if isinstance(stored, dict) else ())
        if not parse.is_failure_header(k)
    }
    out[h.REPLAY_OF] = str(letter.id)
    out[h.REPLAYED_BY] = actor
    return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def build(
    letter: Letter, actor: str, exchange: str, routing_key: str, body: bytes | None = None
) -> Outgoing:
    """The replay of ``letter`` as pigeon publishes it; raises :class:`Unencodable`.

    It keeps the message id and the wire format's properties (content type and
    encoding, correlation id, timestamp, type, app id); it is persistent and
    mandatory. Other AMQP properties (priority, reply-to, expiration) are not
    part of pigeon's wire format and are not carried.
    """
    props = parse.from_json(letter.properties)
    props = props if isinstance(props, dict) else {}
    timestamp = props.get("timestamp")
    out = Outgoing(
        exchange=exchange,
        routing_key=routing_key,
        body=letter.body if body is None else body,
        message_id=letter.message_id,
        event_name=letter.event or _text(props.get("type")) or "",
        headers=replay_headers(letter, actor),
        correlation_id=_text(props.get("correlation_id")),
        app_id=_text(props.get("app_id")),
        content_type=_text(props.get("content_type")) or "",
        content_encoding=_text(props.get("content_encoding")),
        timestamp=timestamp if isinstance(timestamp, datetime) else None,
        mandatory=True,
    )
    check(out)
    return out


def check(out: Outgoing) -> None:
    """Encode ``out`` once without sending it; raises :class:`Unencodable` naming the culprit."""
    bare = replace(out, headers={})
    for key, value in out.headers.items():
        try:
            frames.properties(replace(bare, headers={key: value}))
        except Exception as exc:
            raise Unencodable(
                f"header {key!r} cannot be encoded again ({type(exc).__name__}: {exc}); "
                "the letter stays open. Archive it, or replay a copy without that header "
                "from a shell."
            ) from exc
    try:
        frames.publish_method(1, out.exchange, out.routing_key, mandatory=True)
        frames.content(1, out, MAX_CONTENT)
        size = 14 + len(frames.properties(out)[1])  # class, weight, body size, flags
    except Exception as exc:
        raise Unencodable(
            f"the letter cannot be encoded as an AMQP message ({type(exc).__name__}: {exc}); "
            "the letter stays open"
        ) from exc
    if size > MAX_CONTENT - 8:  # the broker would close the whole connection, not refuse it
        raise Unencodable(
            f"the letter's properties and headers take {size} bytes with the replay marks, "
            f"over the {MAX_CONTENT - 8} of one AMQP frame; the letter stays open. Archive "
            "it, or replay a copy without its largest headers from a shell."
        )
