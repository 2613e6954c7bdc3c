"""Polyglot interop: Node.js services speak Pigeon's wire format with plain amqplib.

The Node scripts live in ``tests/interop`` (``publish.js``, ``consume.js``);
``make test`` installs their packages (``scripts/ensure-node.sh``). They know
nothing of Pigeon but ``docs/wire-format.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from pigeon import Context, Event, headers
from tests.conftest import AMQP_URL, AppFactory, Broker, RunWorker, eventually

INTEROP = Path(__file__).parent / "interop"


class OrderPlaced(Event, name="interop.order.placed"):
    order_id: str
    customer_email: str
    total_cents: int


def node() -> str:
    executable = shutil.which("node")
    if executable is None or not (INTEROP / "node_modules" / "amqplib").is_dir():
        pytest.fail("node or tests/interop/node_modules is missing: run scripts/ensure-node.sh")
    return executable


async def node_script(
    script: str, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """Start ``node tests/interop/SCRIPT ARGS...``; the caller reads its stdout lines."""
    return await asyncio.create_subprocess_exec(
        node(),
        str(INTEROP / script),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PIGEON_")}, **(env or {})},
    )


async def read_json_line(process: asyncio.subprocess.Process, timeout: float = 20) -> Any:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    if not line:
        assert process.stderr is not None
        error = await process.stderr.read()
        raise AssertionError(f"node exited {await process.wait()}: {error.decode()}")
    return json.loads(line)


async def finish(process: asyncio.subprocess.Process) -> int:
    """Wait for ``process`` (killing it after 20 s) and return its exit code."""
    try:
        await asyncio.wait_for(process.communicate(), 20)
    except TimeoutError:
        process.kill()
        await process.communicate()
    assert process.returncode is not None
    return process.returncode


async def publish_from_node(exchange: str, payload: dict[str, Any], **env: str) -> dict[str, str]:
    process = await node_script(
        "publish.js", AMQP_URL, exchange, "interop.order.placed", json.dumps(payload), env=env
    )
    try:
        sent: dict[str, str] = await read_json_line(process)
    finally:
        code = await finish(process)
    assert code == 0
    return sent


async def test_a_node_dispatch_is_handled_by_a_typed_pigeon_listener(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("notification")
    seen: list[tuple[OrderPlaced, Context]] = []

    @app.listener(OrderPlaced)
    async def send_confirmation(event: OrderPlaced, ctx: Context) -> None:
        seen.append((event, ctx))

    await run_worker(app)
    payload = {"order_id": "o-42", "customer_email": "ada@example.com", "total_cents": 1250}
    sent = await publish_from_node(
        app.settings.exchange,
        payload,
        PIGEON_SERVICE="node-orders",
        PIGEON_CORRELATION_ID="checkout-42",
    )

    await eventually(lambda: len(seen) == 1)
    event, ctx = seen[0]
    assert event == OrderPlaced.model_validate(payload)
    assert ctx.message_id == sent["message_id"]
    assert ctx.correlation_id == "checkout-42"
    assert ctx.event_name == "interop.order.placed"
    assert ctx.headers[headers.EVENT_VERSION] == 1
    assert ctx.attempt == 1


async def test_a_node_dispatch_that_fails_validation_is_dead_lettered(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("notification")
    seen: list[OrderPlaced] = []

    @app.listener(OrderPlaced)
    async def send_confirmation(event: OrderPlaced) -> None:
        seen.append(event)

    await run_worker(app)
    sent = await publish_from_node(app.settings.exchange, {"order_id": "o-43"})

    letter = await broker.get(app.settings.dead_letter_queue)
    assert letter.message_id == sent["message_id"]
    assert letter.headers[headers.REASON] == "invalid-payload"
    assert "customer_email" in str(letter.headers[headers.EXCEPTION_MESSAGE])
    assert seen == []


async def test_a_pigeon_dispatch_reaches_a_node_consumer_in_the_documented_wire_format(
    make_app: AppFactory,
) -> None:
    app = make_app("orders")
    await app.declare()
    consumer = await node_script("consume.js", AMQP_URL, app.settings.exchange, "interop.order.*")
    try:
        assert await read_json_line(consumer) == {"ready": True}
        event = OrderPlaced(order_id="o-7", customer_email="grace@example.com", total_cents=990)
        before = int(time.time())
        message_id = await app.dispatch_async(
            event, correlation_id="checkout-7", causation_id="cause-7"
        )
        received = await read_json_line(consumer)
    finally:
        code = await finish(consumer)
    assert code == 0

    assert received["exchange"] == app.settings.exchange
    assert received["routing_key"] == "interop.order.placed"
    properties = received["properties"]
    assert uuid.UUID(properties.pop("message_id")) == uuid.UUID(message_id)
    assert uuid.UUID(message_id).version == 4
    timestamp = properties.pop("timestamp")
    assert before - 1 <= timestamp <= time.time() + 1
    assert properties == {
        "type": "interop.order.placed",
        "app_id": app.service,
        "content_type": "application/json",
        "content_encoding": None,
        "delivery_mode": 2,
        "correlation_id": "checkout-7",
    }
    assert received["headers"][headers.CAUSATION_ID] == "cause-7"
    assert received["headers"][headers.EVENT_VERSION] == 1
    assert received["body"] == {
        "order_id": "o-7",
        "customer_email": "grace@example.com",
        "total_cents": 990,
    }
