"""`pigeon asyncapi`: an AsyncAPI 3.0 document of what apps send and receive.

Documents are validated against the official AsyncAPI 3.0.0 JSON Schema shipped
in ``tests/asyncapi/`` (see its README for where it comes from).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from jsonschema import Draft7Validator
from pydantic import BaseModel

from pigeon import ConfigurationError, Context, Event, Pigeon
from pigeon.asyncapi import build
from pigeon.settings import Settings

ROOT = Path(__file__).parent.parent
SCHEMA = Path(__file__).parent / "asyncapi" / "asyncapi-3.0.0.schema.json"
URL = "amqp://shop:s3cret@rabbit.internal:5672/shop"


class Line(BaseModel):
    sku: str
    quantity: int = 1


class OrderPlaced(Event, name="shop.order.placed"):
    """A customer placed an order.

    Sent once per order, after payment was authorised.
    """

    order_id: str
    lines: list[Line]
    total_cents: int
    placed_at: datetime
    coupon: str | None = None
    channel: Literal["web", "app"] = "web"


class OrderCancelled(Event, name="shop.order.cancelled"):
    order_id: str
    reason: str


class PaymentCaptured(Event, name="shop.payment.captured", version=2):
    order_id: str
    amount_cents: int


def shop(url: str | None = None) -> tuple[Pigeon, Pigeon]:
    """Two services: orders produces orders and listens for payments; notification listens
    to orders (typed and by pattern) and announces e-mails (an untyped event)."""
    orders = Pigeon(service="orders", url=url, dispatches=[OrderPlaced, OrderCancelled])
    notification = Pigeon(service="notification", url=url, dispatches=["shop.email.sent"])

    @orders.listener(PaymentCaptured)
    async def mark_paid(event: PaymentCaptured) -> None: ...

    @notification.listener(OrderPlaced)
    async def send_confirmation(event: OrderPlaced, ctx: Context) -> None: ...

    @notification.listener("shop.order.*", queue="audit.orders")
    def audit(payload: dict[str, Any]) -> None: ...

    @notification.listener("shop.refund.#")
    def refunds(payload: dict[str, Any]) -> None: ...

    return orders, notification


orders, notification = shop()  # what `pigeon asyncapi tests.test_asyncapi:orders ...` loads


@functools.cache
def validator() -> Draft7Validator:
    return Draft7Validator(json.loads(SCHEMA.read_text(encoding="utf-8")))


def assert_valid_asyncapi(document: dict[str, Any]) -> None:
    errors = sorted(validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors)
    for ref in local_refs(document):
        resolve(document, ref)  # raises KeyError for a dangling $ref


def local_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from local_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from local_refs(item)


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} is not a reference inside the document"
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


@pytest.fixture
def document() -> dict[str, Any]:
    return build(shop(URL))


def test_the_shipped_schema_is_the_official_one_and_rejects_a_broken_document() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    assert schema["$id"] == "http://asyncapi.com/definitions/3.0.0/asyncapi.json"
    assert not validator().is_valid({"asyncapi": "3.0.0"}), "info is required"
    assert not validator().is_valid(
        {"asyncapi": "3.0.0", "info": {"title": "t", "version": "1"}, "channels": {"c": []}}
    )


def test_the_document_of_two_apps_is_valid_asyncapi_3(document: dict[str, Any]) -> None:
    assert document["asyncapi"] == "3.0.0"
    assert_valid_asyncapi(document)


def test_each_event_is_a_channel_addressed_by_its_routing_key(document: dict[str, Any]) -> None:
    addresses = {cid: channel["address"] for cid, channel in document["channels"].items()}
    assert addresses == {
        "shop.email.sent": "shop.email.sent",
        "shop.order.cancelled": "shop.order.cancelled",
        "shop.order.placed": "shop.order.placed",
        "shop.payment.captured": "shop.payment.captured",
        "pattern.shop.refund.hash": "shop.refund.#",
    }
    binding = document["channels"]["shop.order.placed"]["bindings"]["amqp"]
    assert binding["is"] == "routingKey"
    assert binding["exchange"] == {
        "name": "pigeon.events",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
        "vhost": "shop",
    }


def test_a_typed_event_message_carries_its_pydantic_schema_and_the_wire_format(
    document: dict[str, Any],
) -> None:
    channel = document["channels"]["shop.order.placed"]
    message = resolve(document, channel["messages"]["shop.order.placed"]["$ref"])
    assert message["title"] == "OrderPlaced"
    assert message["summary"] == "A customer placed an order."
    assert message["contentType"] == "application/json"
    payload = resolve(document, message["payload"]["$ref"])
    expected = OrderPlaced.model_json_schema(ref_template="#/components/schemas/{model}")
    assert payload["properties"] == expected["properties"]
    assert payload["required"] == ["order_id", "lines", "total_cents", "placed_at"]
    assert resolve(document, "#/components/schemas/Line")["required"] == ["sku"]

    assert set(message["headers"]["properties"]) == {
        "x-pigeon-causation-id",
        "x-pigeon-event-version",
        "traceparent",
    }
    assert message["headers"]["properties"]["x-pigeon-event-version"]["const"] == 1
    properties = message["x-pigeon-properties"]["properties"]
    assert set(properties) == {
        "message_id",
        "correlation_id",
        "type",
        "app_id",
        "content_type",
        "delivery_mode",
        "timestamp",
    }
    assert properties["type"]["const"] == "shop.order.placed"
    assert properties["app_id"]["examples"] == ["orders"]
    assert properties["delivery_mode"]["const"] == 2
    assert properties["content_type"]["const"] == "application/json"
    assert message["bindings"]["amqp"]["messageType"] == "shop.order.placed"

    captured = document["components"]["messages"]["shop.payment.captured"]
    assert captured["headers"]["properties"]["x-pigeon-event-version"]["const"] == 2
    untyped = document["components"]["messages"]["shop.email.sent"]
    assert untyped["payload"]["type"] == "object"


def test_producers_send_and_listeners_receive_per_queue(document: dict[str, Any]) -> None:
    operations = {
        op_id: (op["action"], op["channel"]["$ref"], op.get("x-pigeon-queue"))
        for op_id, op in document["operations"].items()
    }
    assert operations == {
        "orders.dispatch.shop.order.placed": ("send", "#/channels/shop.order.placed", None),
        "orders.dispatch.shop.order.cancelled": ("send", "#/channels/shop.order.cancelled", None),
        "notification.dispatch.shop.email.sent": ("send", "#/channels/shop.email.sent", None),
        "orders.mark-paid.receive.shop.payment.captured": (
            "receive",
            "#/channels/shop.payment.captured",
            "orders.mark-paid",
        ),
        "notification.send-confirmation.receive.shop.order.placed": (
            "receive",
            "#/channels/shop.order.placed",
            "notification.send-confirmation",
        ),
        "audit.orders.receive.shop.order.placed": (
            "receive",
            "#/channels/shop.order.placed",
            "audit.orders",
        ),
        "audit.orders.receive.shop.order.cancelled": (
            "receive",
            "#/channels/shop.order.cancelled",
            "audit.orders",
        ),
        "notification.refunds.receive.pattern.shop.refund.hash": (
            "receive",
            "#/channels/pattern.shop.refund.hash",
            "notification.refunds",
        ),
    }
    send = document["operations"]["orders.dispatch.shop.order.placed"]
    assert send["bindings"]["amqp"]["deliveryMode"] == 2
    assert send["messages"] == [{"$ref": "#/channels/shop.order.placed/messages/shop.order.placed"}]
    audit = document["operations"]["audit.orders.receive.shop.order.cancelled"]
    assert audit["x-pigeon-binding"] == "shop.order.*"
    assert audit["x-pigeon-service"] == "notification"


def test_servers_come_from_pigeon_url_with_the_password_masked(
    document: dict[str, Any],
) -> None:
    assert document["servers"] == {
        "rabbitmq": {
            "host": "rabbit.internal:5672",
            "protocol": "amqp",
            "protocolVersion": "0.9.1",
            "description": "RabbitMQ at PIGEON_URL amqp://shop:***@rabbit.internal:5672/shop",
            "pathname": "/shop",
        }
    }
    assert "s3cret" not in json.dumps(document)


def test_apps_on_different_exchanges_are_refused() -> None:
    one = Pigeon(service="a", dispatches=[OrderPlaced])
    other = Pigeon(service="b", settings=Settings(exchange="other.events"))
    with pytest.raises(ConfigurationError, match="different exchanges"):
        build([one, other])


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}
    env["PIGEON_URL"] = URL
    return subprocess.run(
        [sys.executable, "-m", "pigeon", "asyncapi", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_cli_writes_json_and_yaml_of_the_same_valid_document(tmp_path: Path) -> None:
    apps = ("tests.test_asyncapi:orders", "tests.test_asyncapi:notification")
    output = tmp_path / "asyncapi.json"
    written = run_cli(*apps, "--output", str(output))
    assert written.returncode == 0, written.stderr
    as_yaml = run_cli(*apps, "--format", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr

    from_json = json.loads(output.read_text(encoding="utf-8"))
    assert yaml.safe_load(as_yaml.stdout) == from_json
    assert_valid_asyncapi(from_json)
    assert from_json == json.loads(json.dumps(build(shop(URL))))
    assert "s3cret" not in output.read_text(encoding="utf-8") + as_yaml.stdout


def test_the_cli_names_an_app_it_cannot_import() -> None:
    result = run_cli("tests.no_such_module:app")
    assert result.returncode == 2
    assert "cannot import 'tests.no_such_module'" in result.stderr
