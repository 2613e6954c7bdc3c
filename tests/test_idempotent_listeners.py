"""Messages can arrive twice; a listener's side effects happen once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pigeon import Context, Pigeon, Retry
from pigeon.idempotency import IdempotencyStore, open_store
from tests.conftest import AppFactory, Broker, RunWorker, eventually, unique_settings
from tests.events import OrderPlaced
from tests.procs import (
    drain_and_stop,
    recorded,
    recorder,
    start_listener,
    stop,
    wait_for_log,
    wait_recorded,
)
from tests.tcpproxy import TcpProxy

STORES = {
    "memory": "memory://",
    "sqlite": "sqlite:///{tmp}/idem.db",
    "redis": "redis://127.0.0.1:6379/0",
    "postgres": "postgresql://postgres@127.0.0.1:5432/test",
}


@pytest.fixture(params=list(STORES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[IdempotencyStore]:
    s = open_store(STORES[request.param].format(tmp=tmp_path))
    await s.open()
    yield s
    await s.close()


async def test_the_same_message_id_dispatched_twice_is_handled_once(
    make_app: AppFactory, run_worker: RunWorker, store: IdempotencyStore
) -> None:
    app = make_app("notification")
    sent: list[str] = []

    @app.listener(OrderPlaced)
    async def send(event: OrderPlaced) -> None:
        sent.append(event.order_id)

    worker = await run_worker(app, store=store)
    message_id = f"order-{uuid.uuid4()}"
    await app.dispatch_async(OrderPlaced(order_id="o-1"), message_id=message_id)
    await eventually(lambda: sent == ["o-1"])
    await app.dispatch_async(OrderPlaced(order_id="o-1"), message_id=message_id)
    await eventually(lambda: worker.counts["duplicate"] == 1)
    assert sent == ["o-1"]


async def test_a_failed_message_is_not_remembered_so_its_retry_runs(
    make_app: AppFactory, run_worker: RunWorker, store: IdempotencyStore
) -> None:
    app = make_app("notification")
    attempts: list[int] = []

    @app.listener(OrderPlaced, retry=Retry(attempts=2, delays=[0.1]))
    async def send(event: OrderPlaced, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            raise ConnectionError("smtp down")

    await run_worker(app, store=store)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await eventually(lambda: attempts == [1, 2])


async def test_a_message_redelivered_after_a_lost_ack_is_not_handled_again(
    prefix: str, broker: Broker, run_worker: RunWorker, tmp_path: Path
) -> None:
    proxy = TcpProxy()
    await proxy.start()
    settings = unique_settings(
        prefix,
        url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
        idempotency_url=f"sqlite:///{tmp_path}/idem.db",
    )
    app = Pigeon(service=f"{prefix}-notification", settings=settings)
    broker.apps.append(app)
    calls: list[bool] = []
    cut_done = asyncio.Event()

    @app.listener(OrderPlaced)
    async def send(event: OrderPlaced, ctx: Context) -> None:
        calls.append(ctx.redelivered)
        if len(calls) == 1:
            await proxy.cut()  # the connection dies while the handler runs: the ack is lost
            cut_done.set()

    worker = await run_worker(app)
    producer = Pigeon(service=f"{prefix}-orders", settings=unique_settings(prefix))
    await producer.dispatch_async(OrderPlaced(order_id="o-1"))
    await eventually(lambda: worker.counts["duplicate"] == 1, timeout=30)
    assert calls == [False], "the redelivery was recognised, the handler ran once"
    await producer.close()
    await proxy.stop()


@pytest.mark.slow
async def test_two_listener_processes_on_one_queue_handle_each_id_once(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(
        make_app,
        broker,
        tmp_path,
        PIGEON_IDEMPOTENCY_URL=f"sqlite:///{tmp_path}/shared.db",
    )
    app, rec, env = setup.app, setup.rec, setup.env
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    procs = [start_listener(env, "--concurrency", "8", log=log) for log in logs]
    try:
        for log in logs:
            wait_for_log(log, "worker.consuming")
        ids = [f"o-{i}-{uuid.uuid4()}" for i in range(200)]
        for round_ in range(2):  # every id dispatched twice
            await asyncio.gather(
                *(
                    app.dispatch_async("test.order.placed", {"n": round_}, message_id=mid)
                    for mid in ids
                )
            )
        wait_recorded(rec, 200, timeout=60)
        assert await drain_and_stop(broker, f"{app.service}.record", procs) == [0, 0]
        done = recorded(rec)
        assert sorted(done) == sorted(ids), "each id handled once across both processes"
        assert all(log.read_text().count("message.handled") > 0 for log in logs), "both worked"
    finally:
        for proc in procs:
            assert stop(proc) == 0
    await app.close()
