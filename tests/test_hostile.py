"""Hostile messages: no message can stop a worker or drop its connection.

Every message here is published with pika (see ``tests/hostile.py``), so its
bytes are what another client could send, not what Pigeon would.
"""

from __future__ import annotations

import struct
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pamqp.decode
import pytest

from pigeon import Context, DispatchError, Retry, headers
from pigeon.errors import InvalidHeaderError
from pigeon.tables import encode_table
from pigeon.unmarshal import UndecodableHeader, unmarshal
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.hostile import Hostile, get, publish, publish_all
from tests.procs import recorded, stop, wait_for_log, wait_recorded

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


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"n": value}
    return value


async def test_headers_pamqp_cannot_encode_are_retried_and_dead_lettered_intact(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("ledger")
    runs: list[int] = []

    @app.listener("test.order.placed", retry=Retry(attempts=3, delays=[0.1]))
    async def book(payload: dict[str, Any], ctx: Context) -> None:
        runs.append(ctx.attempt)
        assert ctx.headers["x-offset"] == -1
        assert ctx.headers["x-price"] == Decimal("-1.5"), "a negative decimal is read right"
        raise RuntimeError("ledger down")

    worker = await run_worker(app)
    hostile = {"x-offset": -1, "x-price": Decimal("-1.5"), "x-raw": b"\x00\xff"}
    await publish(app.settings.exchange, "test.order.placed", message_id="m-1", headers=hostile)
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "handler-error"
    assert "ledger down" in str(letter.headers[headers.EXCEPTION_MESSAGE])
    assert letter.headers["x-offset"] == -1
    assert letter.headers["x-raw"] == b"\x00\xff"
    assert runs == [1, 2, 3], "each attempt ran once: no settle failure re-ran one"
    assert headers.DROPPED_HEADERS not in letter.headers
    assert worker.connections == 1


async def test_a_header_that_cannot_be_sent_again_is_dropped_and_named(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("ledger")

    @app.listener("test.order.placed", retry=FAST)
    async def book(payload: dict[str, Any]) -> None:
        raise RuntimeError("ledger down")

    await run_worker(app)
    hostile = {"x-deep": _nested(40), "x-huge": "h" * 125_000, "x-fine": "kept"}
    await publish(app.settings.exchange, "test.order.placed", message_id="m-2", headers=hostile)
    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.headers[headers.REASON] == "handler-error"
    assert letter.headers[headers.DROPPED_HEADERS] == "x-deep,x-huge"
    assert letter.headers["x-fine"] == "kept"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (2**70, "does not fit in 64 signed bits"),
        (object(), "has no AMQP encoding"),
        (Decimal("NaN"), "not finite"),
        ("\udcff", "not valid text"),
    ],
    ids=["huge-int", "object", "nan", "surrogate"],
)
async def test_dispatch_refuses_a_header_it_cannot_encode_naming_the_key(
    make_app: AppFactory, value: object, problem: str
) -> None:
    app = make_app("shop")
    with pytest.raises(InvalidHeaderError, match=problem) as caught:
        await app.dispatch_async("test.order.placed", {}, headers={"x-bad": value})
    assert caught.value.key == "x-bad"
    assert isinstance(caught.value, DispatchError)
    assert "'x-bad'" in str(caught.value)


async def test_dispatch_sends_negative_small_ints_and_decimals_as_rabbitmq_reads_them(
    make_app: AppFactory, broker: Broker
) -> None:
    app = make_app("shop")
    name = f"{broker.prefix}.headers"
    broker.queues.add(name)
    channel = await broker.connection.channel()
    await app.declare()
    queue = await channel.declare_queue(name)
    await queue.bind(app.settings.exchange, "test.order.placed")
    sent = {"x-offset": -1, "x-min": -128, "x-short": -300, "x-price": Decimal("-12.34")}
    await app.dispatch_async("test.order.placed", {}, headers=sent)
    properties, _ = await get(name)
    assert {k: properties.headers[k] for k in sent} == sent


def test_every_encodable_value_reads_back_the_same() -> None:
    value = {
        "b": -1,
        "s": -300,
        "i": -70_000,
        "l": -(2**40),
        "f": 0.1,
        "t": True,
        "S": "text",
        "x": bytearray(b"\x00\xff"),
        "T": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        "F": {"n": [1, "a", None]},
        "V": None,
    }
    _, decoded = pamqp.decode.field_table(encode_table(value))
    assert decoded == value


RK = "test.order.placed"
FAIL = b'{"mode": "fail"}'
#: name -> (routing key, body, pika properties, expected dead-letter reason or "handled")
KINDS: dict[str, tuple[str | bytes, bytes, dict[str, Any], str]] = {
    # the defects of issue 18
    "header-key-not-utf-8": (RK, b"{}", {"headers": {b"x-\xff": 1}}, "undecodable"),
    "message-id-not-utf-8": (RK, b"{}", {"message_id": b"k-mid-\xff"}, "undecodable"),
    "type-not-utf-8": (RK, b"{}", {"type": b"\xc3("}, "undecodable"),
    "correlation-id-not-utf-8": (RK, b"{}", {"correlation_id": b"\xfe"}, "undecodable"),
    "routing-key-not-utf-8": (b"test.\xff", b"{}", {}, "undecodable"),
    "timestamp-out-of-range": (RK, b"{}", {"timestamp": 2**63}, "undecodable"),
    "header-minus-one-failing": (RK, FAIL, {"headers": {"x-offset": -1}}, "handler-error"),
    "header-negative-decimal": (RK, b"{}", {"headers": {"x-p": Decimal("-1.5")}}, "handled"),
    "header-negative-decimal-failing": (
        RK,
        FAIL,
        {"headers": {"x-p": Decimal("-1.5")}},
        "handler-error",
    ),
    "header-bytes-failing": (RK, FAIL, {"headers": {"x-raw": b"\x00\xff"}}, "handler-error"),
    "header-nested-40-deep-failing": (RK, FAIL, {"headers": {"x": _nested(40)}}, "handler-error"),
    "headers-near-frame-max-failing": (
        RK,
        FAIL,
        {"headers": {"x-huge": "h" * 125_000}},
        "handler-error",
    ),
    "json-nested-100k-deep": (RK, b"[" * 100_000, {}, "invalid-payload"),
    # the eleven malformed kinds that were already dead-lettered or handled
    "broken-json": (RK, b'{"order_id":', {}, "invalid-payload"),
    "json-array": (RK, b"[1, 2]", {}, "invalid-payload"),
    "json-null": (RK, b"null", {}, "invalid-payload"),
    "empty-body": (RK, b"", {}, "invalid-payload"),
    "body-not-utf-8": (RK, b'{"a": "\xff\xfe"}', {}, "invalid-payload"),
    "xml": (RK, b"<order/>", {"content_type": "application/xml"}, "unsupported-content-type"),
    "gzip": (RK, b"\x1f\x8b\x08", {"content_encoding": "gzip"}, "unsupported-content-type"),
    "body-2-mib": (RK, b'{"x": "' + b"x" * 2_097_152 + b'"}', {}, "body-too-large"),
    "attempt-header-not-a-number": (RK, b"{}", {"headers": {"x-pigeon-attempt": "x"}}, "handled"),
    "attempt-header-huge-failing": (
        RK,
        FAIL,
        {"headers": {"x-pigeon-attempt": 10**6}},
        "handler-error",
    ),
    "handler-fails": (RK, FAIL, {}, "handler-error"),
}


def _message_id(name: str, props: dict[str, Any]) -> str:
    raw = props.get("message_id", f"k-{name}")
    return raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)


async def test_one_listener_process_outlives_every_hostile_message(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    hostile = Hostile(make_app, broker, tmp_path)
    proc = hostile.start()
    wait_for_log(hostile.log, "worker.consuming")
    messages = [
        (rk, body, {"message_id": f"k-{name}", **props})
        for name, (rk, body, props, _) in KINDS.items()
    ]
    await publish_all(hostile.app.settings.exchange, messages)
    dead = {_message_id(n, p): r for n, (_, _, p, r) in KINDS.items() if r != "handled"}
    handled = {f"k-{name}" for name, (*_, r) in KINDS.items() if r == "handled"}
    try:
        letters = [await broker.get(hostile.app.settings.dead_letter_queue, 30) for _ in dead]
        wait_recorded(hostile.rec, len(handled), kind="done")
        await hostile.app.dispatch_async(RK, {}, message_id="sentinel")
        wait_recorded(hostile.rec, len(handled) + 1, kind="done")
        assert proc.poll() is None, "the same process ran throughout"
    finally:
        assert stop(proc) == 0
    reasons = {str(m.message_id): m.headers[headers.REASON] for m in letters}
    assert reasons == dead, "each dead letter once, with its reason"
    assert set(recorded(hostile.rec, "done")) == handled | {"sentinel"}
    starts = Counter(line.split()[0] for line in recorded(hostile.rec, "start"))
    assert max(starts.values()) <= 2, f"no message ran more than its two attempts: {starts}"
    assert await broker.count(hostile.app.settings.dead_letter_queue) == 0, "no extra letters"
    assert await broker.count(hostile.queue) == 0
    log = hostile.log.read_text()
    assert log.count("worker.consuming") == 1, "never reconnected"
    assert "connection_lost" not in log
    by_id = {str(m.message_id): m for m in letters}
    assert by_id["k-header-minus-one-failing"].headers["x-offset"] == -1
    assert by_id["k-headers-near-frame-max-failing"].headers[headers.DROPPED_HEADERS] == "x-huge"
    assert by_id["k-header-nested-40-deep-failing"].headers[headers.DROPPED_HEADERS] == "x"


async def test_a_basic_get_of_a_message_that_is_not_utf_8_keeps_the_connection(
    broker: Broker,
) -> None:
    name = f"{broker.prefix}.get"
    broker.queues.add(name)
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(name)
    await queue.bind("amq.topic", "bad.#")
    await publish("amq.topic", b"bad.\xff", b"{}", message_id=b"\xfe", headers={b"k\xff": 1})
    message = await broker.get(name)
    assert message.routing_key == "bad.\\xff"
    assert message.message_id == "\\xfe"
    assert message.headers == {"k\\xff": 1}
    assert not broker.connection.is_closed
