"""PIGEON_QUORUM_SIZE: the initial group size of the quorum queues Pigeon declares.

RabbitMQ 3.10 checks ``x-quorum-initial-group-size`` for equivalence, so a
queue made before the setting was given (or changed) must keep working: its
own size is kept. Any other difference still fails with the fix.
"""

from __future__ import annotations

import pytest

from pigeon import Context, topology
from pigeon.errors import TopologyError
from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.events import OrderPlaced


def test_pigeon_quorum_size_sets_the_initial_group_size_of_every_quorum_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIGEON_QUORUM_SIZE", "3")
    settings = Settings()
    assert settings.quorum_size == 3
    queues = [
        *topology.core_topology(settings).queues,
        topology.listener_queue(settings, "svc.x", ["a.b"]),
        topology.retry_tier("svc.x", 5, quorum_size=settings.quorum_size),
    ]
    assert all(q.arguments[topology.GROUP_SIZE] == 3 for q in queues)


def test_without_pigeon_quorum_size_rabbitmq_places_the_queue_on_all_nodes_up_to_3() -> None:
    settings = Settings()
    assert settings.quorum_size is None
    queue = topology.listener_queue(settings, "svc.x", ["a.b"])
    assert topology.GROUP_SIZE not in queue.arguments, "RabbitMQ's default: min(3, nodes)"


def test_a_quorum_size_below_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIGEON_QUORUM_SIZE", "0")
    with pytest.raises(ValueError, match="PIGEON_QUORUM_SIZE"):
        Settings()


@pytest.mark.parametrize(("before", "after"), [(None, 1), (1, None), (1, 3)])
async def test_an_existing_queue_keeps_its_group_size_and_is_consumed(
    make_app: AppFactory, broker: Broker, run_worker: RunWorker, before: int | None, after: int
) -> None:
    app = make_app("sized")
    app.settings.quorum_size = before
    seen: list[str] = []

    @app.listener(OrderPlaced)
    async def record(event: OrderPlaced, ctx: Context) -> None:
        seen.append(event.order_id)

    await app.declare()
    await app.close()
    app.settings.quorum_size = after
    await app.declare()  # no PRECONDITION_FAILED
    await run_worker(app)
    await app.dispatch_async(OrderPlaced(order_id="o-1"))
    await eventually(lambda: seen == ["o-1"], 15, "the event handled")


async def test_another_difference_still_fails_with_the_fix_when_the_size_differs_too(
    make_app: AppFactory, broker: Broker
) -> None:
    app = make_app("mismatch")
    queue = f"{app.service}.record"
    broker.queues.add(queue)
    wanted = topology.listener_queue(app.settings, queue, ["test.order.placed"])
    channel = await broker.connection.channel()
    await channel.declare_queue(
        queue, durable=True, arguments={**wanted.arguments, "x-delivery-limit": 5}
    )
    await channel.close()
    app.settings.quorum_size = 1

    @app.listener(OrderPlaced, queue=queue)
    async def record(event: OrderPlaced) -> None: ...

    with pytest.raises(TopologyError, match="x-delivery-limit=5"):
        await app.declare()
