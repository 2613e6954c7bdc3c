"""Hostile messages: no message can stop a worker or drop its connection.

Every message here is published with pika (see ``tests/hostile.py``), so its
bytes are what another client could send, not what Pigeon would.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest

from pigeon import Context, Retry, headers
from pigeon.unmarshal import UndecodableHeader, unmarshal
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.hostile import publish

FAST = Retry(attempts=2, delays=[0.1])


@pytest.mark.parametrize(
    ("routing_key", "props", "problem"),
    [
        ("test.order.placed", {"headers": {b"x-bad-\xff": 1}}, "header key"),
        ("test.order.placed", {"message_id": b"id-\xff\xfe"}, "message_id"),
        ("test.order.placed", {"message_id": "m", "type": b"\xc3("}, "message_type"),
        (b"test.order.\xff", {"message_id": "m"}, "routing key"),
    ],
    ids=["header-key", "message-id", "type", "routing-key"],
)
async def test_a_message_that_is_not_utf_8_is_dead_lettered_as_undecodable(
    make_app: AppFactory,
    run_worker: RunWorker,
    broker: Broker,
    routing_key: str | bytes,
    props: dict[str, Any],
    problem: str,
) -> None:
    app = make_app("audit")
    handled: list[str] = []

    @app.listener("test.order.*", retry=FAST)
    async def audit(payload: dict[str, Any], ctx: Context) -> None:
        handled.append(ctx.message_id)

    worker = await run_worker(app)
    await publish(app.settings.exchange, routing_key, b'{"order_id": "o-1"}', **props)
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "undecodable"
    assert problem in str(letter.headers[headers.EXCEPTION_MESSAGE])
    assert letter.body == b'{"order_id": "o-1"}', "the dead letter keeps the original body"
    if routing_key == "test.order.placed":
        raw = letter.headers[headers.UNDECODABLE]
        assert isinstance(raw, bytes | bytearray)
        assert raw, "the raw property bytes are kept"
    await app.dispatch_async("test.order.placed", {"order_id": "good"}, message_id="good-1")
    await eventually(lambda: handled == ["good-1"])
    assert worker.connections == 1, "the connection was never dropped"


def _header_frame(properties: bytes, flags: int) -> bytes:
    payload = struct.pack(">HHQH", 60, 0, 2, flags) + properties
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def test_a_header_value_of_an_unknown_type_keeps_the_headers_before_it_and_the_rest() -> None:
    table = b"\x02okS\x00\x00\x00\x01a" + b"\x03badZ\x00"
    properties = struct.pack(">I", len(table)) + table + b"\x02" + b"\x02id"
    flags = 1 << 13 | 1 << 12 | 1 << 7  # headers, delivery mode, message id
    _, channel, frame = unmarshal(_header_frame(properties, flags))
    assert channel == 1
    assert isinstance(frame, UndecodableHeader)
    assert frame.properties.headers == {"ok": "a"}
    assert frame.properties.message_id == "id", "properties after the bad table are still read"
    assert frame.properties.delivery_mode == 2
    assert "'bad' has an unreadable value" in frame.problems[0]
    assert frame.raw == properties
