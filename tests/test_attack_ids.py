"""An outside tester's attack: message ids a store cannot hold, published with pika.

A message id is any AMQP short string: up to 255 bytes of UTF-8, NUL included.
PostgreSQL's ``text`` cannot hold NUL, and the PostgreSQL idempotency store
claims a whole prefetch of messages in one statement.
"""

from __future__ import annotations

from typing import Any

import pytest

from pigeon import Context, Pigeon, Retry
from tests.conftest import AppFactory, Broker, RunWorker, eventually, unique_settings
from tests.hostile import Message, publish_all
from tests.outbox_support import pg_name

__all__ = ["pg_name"]


async def test_a_nul_message_id_does_not_fail_its_neighbours_on_the_postgres_store(
    run_worker: RunWorker, broker: Broker, prefix: str, pg_name: str
) -> None:
    settings = unique_settings(
        prefix, idempotency_url=f"postgresql://postgres@127.0.0.1:5432/{pg_name}"
    )
    app = Pigeon(service=f"{prefix}-ledger", settings=settings)
    broker.apps.append(app)
    broker.track(settings)
    tries: list[tuple[str, int]] = []

    @app.listener("attack.ids.booked", retry=Retry(attempts=3, immediate=2))
    async def book(payload: dict[str, Any], ctx: Context) -> None:
        tries.append((payload["n"], ctx.attempt))

    worker = await run_worker(app, prefetch=50)
    nul: Message = ("attack.ids.booked", b'{"n": "nul"}', {"message_id": "m\x00nul"})
    messages: list[Message] = [
        ("attack.ids.booked", f'{{"n": "{i}"}}'.encode(), {"message_id": f"m-{i}"})
        for i in range(20)
    ]
    messages[5:5] = [nul]
    messages[15:15] = [nul]  # its duplicate
    await publish_all(settings.exchange, messages)
    await eventually(
        lambda: (
            worker.counts["acked"] + worker.counts["duplicate"] >= 22
            or worker.counts["dead_lettered"] > 0
        ),
        timeout=30,
        message="every message settled",
    )

    assert worker.counts["dead_lettered"] == 0
    assert sorted(n for n, _ in tries) == sorted(["nul", *map(str, range(20))])
    assert {attempt for _, attempt in tries} == {1}, "no neighbour failed its claim"


async def test_dispatch_names_the_message_id_when_it_is_too_long(
    make_app: AppFactory,
) -> None:
    """The error said "the correlation id is 300 bytes long" for a message id the caller
    gave (the correlation id defaults to it, and was checked first)."""
    app = make_app("shop")

    with pytest.raises(ValueError, match="the message id is 300 bytes"):
        await app.dispatch_async("attack.ids.placed", {}, message_id="m" * 300)
