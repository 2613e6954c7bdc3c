"""Reading dead letters (pure logic, no broker): every kind of letter is understood."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from letterthief import parse

DEATH_TIME = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_a_native_delivery_limit_is_named_like_pigeon_names_it() -> None:
    r = parse.describe(
        body=b"{}",
        headers={
            "x-death": [
                {
                    "count": 1,
                    "reason": "delivery_limit",
                    "queue": "billing.charge",
                    "time": DEATH_TIME,
                    "exchange": "pigeon.events",
                    "routing-keys": ["order.placed"],
                }
            ],
            "x-delivery-count": 20,
        },
        properties={"message_id": "m-1"},
        exchange="pigeon.dead",
        routing_key="billing.charge",
    )
    assert r.reason == "delivery-limit"
    assert r.queue == "billing.charge"
    assert r.exchange == "pigeon.events"
    assert r.routing_key == "order.placed"
    assert r.event == "order.placed"
    assert r.service == "billing"
    assert r.attempts == 20
    assert r.failed_at == DEATH_TIME
    assert "x-delivery-limit" in r.exception_message


def test_pigeon_headers_win_over_an_older_x_death_from_a_retry_tier() -> None:
    r = parse.describe(
        body=b"{}",
        headers={
            "x-death": [{"reason": "expired", "queue": "billing.charge.retry.5s", "count": 1}],
            "x-pigeon-reason": "handler-error",
            "x-pigeon-exception-type": "KeyError",
            "x-pigeon-queue": "billing.charge",
            "x-pigeon-attempts": 3,
        },
        properties={"message_id": "m-2", "type": "order.placed"},
        exchange="pigeon.dead",
        routing_key="billing.charge",
        events_exchange="pigeon.events",
    )
    assert (r.reason, r.queue, r.exception_type, r.attempts) == (
        "handler-error",
        "billing.charge",
        "KeyError",
        3,
    )
    assert r.exchange == "pigeon.events"


def test_a_message_without_any_failure_headers_still_becomes_a_letter() -> None:
    r = parse.describe(
        body=b"raw", headers={}, properties={}, exchange="pigeon.dead", routing_key="legacy.q"
    )
    assert r.reason == "unknown"
    assert r.queue == "legacy.q"
    assert r.message_id.startswith("no-id-")
    same = parse.describe(
        body=b"raw", headers={}, properties={}, exchange="pigeon.dead", routing_key="legacy.q"
    )
    assert same.message_id == r.message_id


def test_amqp_header_values_survive_storage_exactly() -> None:
    headers = {"b": b"\x00\xff", "t": DEATH_TIME, "d": Decimal("1.50"), "n": [1, {"x": b"y"}]}
    assert parse.from_json(parse.to_json(headers)) == headers


def test_replays_drop_every_header_that_describes_the_failure() -> None:
    for name in (
        "x-pigeon-reason",
        "x-pigeon-traceback",
        "x-pigeon-attempt",
        "x-death",
        "x-first-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
    ):
        assert parse.is_failure_header(name), name
    assert not parse.is_failure_header("x-pigeon-causation-id")


def test_bodies_are_shown_as_pretty_json_text_or_hex() -> None:
    assert parse.body_view(b'{"a":1}', "application/json") == ("json", '{\n  "a": 1\n}')
    assert parse.body_view(b"hello", "text/plain") == ("text", "hello")
    kind, dump = parse.body_view(b"\x00\x01ab", "application/octet-stream")
    assert kind == "hex"
    assert dump.startswith("00000000  00 01 61 62")
    assert dump.endswith("|..ab|")
