"""An outside tester's attack: messages built from raw AMQP frames.

Every message here is built byte by byte (``tests/rawamqp.py``), so its
field tables can use each type RabbitMQ accepts, not only those pika writes.
"""

from __future__ import annotations

from typing import Any

from pigeon import Context, Retry, headers
from tests.conftest import AppFactory, Broker, RunWorker
from tests.rawamqp import (
    DELIVERY_MODE,
    HEADERS,
    MESSAGE_ID,
    Raw,
    longstr,
    publish_raw,
    shortstr,
    table,
)


async def test_trimming_a_header_table_near_frame_max_keeps_the_attempt_count(
    make_app: AppFactory, run_worker: RunWorker, broker: Broker
) -> None:
    app = make_app("ledger")
    runs: list[int] = []

    @app.listener("test.order.placed", retry=Retry(attempts=2, delays=[0.1]))
    async def book(payload: dict[str, Any], ctx: Context) -> None:
        runs.append(ctx.attempt)
        raise RuntimeError("ledger down")

    await run_worker(app)
    many = table(*((f"k{i:05}".encode(), b"S" + longstr(b"vvvv")) for i in range(7800)))
    props = [(DELIVERY_MODE, b"\x02"), (MESSAGE_ID, shortstr(b"m-many")), (HEADERS, many)]
    await publish_raw(app.settings.exchange, [Raw(b"test.order.placed", b"{}", props)])
    letter = await broker.get(app.settings.dead_letter_queue, 15)
    assert letter.headers[headers.REASON] == "handler-error"
    assert letter.headers[headers.ATTEMPTS] == 2
    assert runs == [1, 2], "the retry copy kept its attempt: no endless retry loop"
    dropped = str(letter.headers[headers.DROPPED_HEADERS]).split(",")
    assert "k00000" in dropped, "what the retry copy dropped is still named"
    assert not [key for key in dropped if key.startswith("x-pigeon-")], dropped
