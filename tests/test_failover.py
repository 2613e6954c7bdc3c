"""Several brokers in PIGEON_URL: connect to the first that answers, fail over on loss.

Two TCP proxies in front of the machine's RabbitMQ stand in for two nodes of a
cluster: stopping a proxy is a node going away, without touching the broker.
The real three-node cluster is exercised in tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
from collections.abc import AsyncIterator

import pytest
from structlog.testing import capture_logs

from pigeon import Context, Pigeon
from pigeon.amqp.connection import Connector, _with_heartbeat
from pigeon.settings import Settings, broker_urls, mask_url
from tests.conftest import AMQP_URL, AppFactory, Broker, RunWorker, eventually
from tests.events import OrderPlaced
from tests.procs import PIGEON, ROOT, env_for
from tests.tcpproxy import TcpProxy


def dead_url() -> str:
    """A node that is down: nothing listens on its port."""
    return f"amqp://guest:secret@127.0.0.1:{TcpProxy.free_port()}/"


def via(proxy: TcpProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


@pytest.fixture
async def nodes() -> AsyncIterator[list[TcpProxy]]:
    proxies = [TcpProxy(), TcpProxy()]
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.stop()


def test_pigeon_url_takes_several_full_urls_separated_by_commas() -> None:
    url = "amqp://u:p1@h1:5672/vh, amqp://u:p2@h2:5672/vh,amqp://u:p3@h3:5672/vh,"
    assert broker_urls(url) == [
        "amqp://u:p1@h1:5672/vh",
        "amqp://u:p2@h2:5672/vh",
        "amqp://u:p3@h3:5672/vh",
    ]
    with pytest.raises(ValueError, match="PIGEON_URL is empty"):
        broker_urls(" , ")


def test_a_cluster_connection_asks_for_a_short_heartbeat_unless_the_url_names_one() -> None:
    assert _with_heartbeat("amqp://g:g@h:5701/vh", 5) == "amqp://g:g@h:5701/vh?heartbeat=5"
    assert _with_heartbeat("amqps://h/vh?cafile=/ca.pem", 5) == (
        "amqps://h/vh?cafile=/ca.pem&heartbeat=5"
    )
    assert _with_heartbeat("amqp://h/?heartbeat=30", 5) == "amqp://h/?heartbeat=30"


def test_a_list_of_urls_is_masked_node_by_node() -> None:
    masked = mask_url("amqp://u:p1@h1:5701/vh,amqps://u:p2@h2:5702/vh")
    assert masked == "amqp://u:***@h1:5701/vh,amqps://u:***@h2:5702/vh"


def test_the_order_is_shuffled_per_process_unless_pigeon_url_shuffle_is_0(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    urls = [f"amqp://g:g@127.0.0.1:{5701 + i}/" for i in range(6)]
    orders = {tuple(Connector(",".join(urls), name="t").urls) for _ in range(20)}
    assert len(orders) > 1, "load spreads over the nodes"
    assert all(sorted(order) == sorted(urls) for order in orders)
    monkeypatch.setenv("PIGEON_URL", ",".join(urls))
    monkeypatch.setenv("PIGEON_URL_SHUFFLE", "0")
    settings = Settings()
    assert not settings.url_shuffle
    assert Connector.for_settings(settings, name="t").urls == urls


async def test_the_first_node_that_answers_is_used_and_logs_name_it() -> None:
    live = AMQP_URL
    connector = Connector(f"{dead_url()},{live}", name="t", shuffle=False)
    with capture_logs() as logs:
        connection = await connector.get()
    try:
        assert not connection.is_closed
        assert connector.url == live
        assert connector.masked_url == mask_url(live)
        events = {entry["event"]: entry for entry in logs}
        assert "secret" not in events["broker.node_unreachable"]["url"]
        assert events["broker.connected"]["url"] == mask_url(live)
    finally:
        await connector.close()


async def test_no_node_answering_is_one_retryable_error_naming_every_node() -> None:
    first, second = dead_url(), dead_url()
    connector = Connector(f"{first},{second}", name="t", shuffle=False)
    with pytest.raises(ConnectionError) as caught:
        await connector.get(timeout=2)
    assert mask_url(first) in str(caught.value)
    assert mask_url(second) in str(caught.value)
    assert "secret" not in str(caught.value)


async def test_a_node_that_accepts_but_never_answers_is_not_waited_out() -> None:
    """A partitioned or hung node: the next node is tried alongside it long before the
    silent one's connect timeout (60 s here) runs out."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    connector = Connector(f"amqp://g:g@127.0.0.1:{port}/,{AMQP_URL}", name="t", shuffle=False)
    try:
        connection = await asyncio.wait_for(connector.get(timeout=60), 20)
        assert not connection.is_closed
        assert connector.url == AMQP_URL
    finally:
        await connector.close()
        server.close()
        await server.wait_closed()
        gc.collect()


async def test_dispatch_fails_over_to_the_next_node_when_its_node_goes_away(
    make_app: AppFactory, broker: Broker, nodes: list[TcpProxy]
) -> None:
    app = make_app("producer")
    app.settings.url = ",".join(via(node) for node in nodes)
    app.settings.url_shuffle = False
    await app.declare([])
    queue = f"{app.service}.probe"
    broker.queues.add(queue)
    channel = await broker.connection.channel()
    q = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await q.bind(app.settings.exchange, "test.order.placed")
    await app.dispatch_async(OrderPlaced(order_id="o-1", customer_email="a@b.c", total_cents=1))
    assert app.runtime().connector.url == via(nodes[0])
    await nodes[0].stop()
    await app.dispatch_async(OrderPlaced(order_id="o-2", customer_email="a@b.c", total_cents=1))
    assert app.runtime().connector.url == via(nodes[1])
    assert await broker.wait_count(queue, 2) == 2
    await channel.close()


async def test_the_worker_fails_over_to_the_next_node_without_a_restart(
    make_app: AppFactory, run_worker: RunWorker, nodes: list[TcpProxy]
) -> None:
    app = make_app("worker")
    app.settings.url = ",".join(via(node) for node in nodes)
    app.settings.url_shuffle = False
    seen: list[str] = []

    @app.listener(OrderPlaced)
    async def record(event: OrderPlaced, ctx: Context) -> None:
        seen.append(event.order_id)

    worker = await run_worker(app)
    assert worker._runtime is not None
    assert worker._runtime.connector.url == via(nodes[0])
    await nodes[0].stop()
    await eventually(lambda: worker.connections >= 2 and worker.ready.is_set(), 30, "reconnect")
    assert worker._runtime.connector.url == via(nodes[1])
    producer = Pigeon(service="other", settings=app.settings.model_copy(update={"url": AMQP_URL}))
    try:
        await producer.dispatch_async(
            OrderPlaced(order_id="after", customer_email="a@b.c", total_cents=1)
        )
        await eventually(lambda: "after" in seen, 15, "the event after the failover handled")
    finally:
        await producer.close()


async def test_pigeon_topology_declare_skips_a_node_that_is_down(
    make_app: AppFactory, broker: Broker
) -> None:
    app = make_app("topo")
    broker.queues.add(f"{app.service}.record")
    env = env_for(app.settings, app.service or "")
    env["PIGEON_URL"] = f"{dead_url()},{AMQP_URL}"
    env["PIGEON_URL_SHUFFLE"] = "0"
    done = await asyncio.to_thread(
        subprocess.run,
        [*PIGEON, "topology", "declare", "tests.apps.recorder:app"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"queue {app.service}.record" in done.stdout
    assert await broker.count(f"{app.service}.record") == 0, "declared on the live node"


async def test_a_consumer_the_broker_cancelled_is_resubscribed_on_its_channel_at_once(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    """What RabbitMQ does when a queue's leader moves away under a consumer (classic
    mirrored queues, ``x-cancel-on-ha-failover``) or the queue is re-created: a
    ``basic.cancel`` that aiormq answers by forgetting the consumer. Its own cancel
    leaves the channel in exactly that state."""
    app = make_app("resubscribe")
    seen: list[str] = []

    @app.listener(OrderPlaced)
    async def record(event: OrderPlaced, ctx: Context) -> None:
        seen.append(event.order_id)

    worker = await run_worker(app)
    (consumer,) = worker._consumers
    cancelled = consumer.tag
    await consumer.cancel()
    with capture_logs() as logs:
        await eventually(lambda: worker._consumers[0].tag != cancelled, 5, "a new subscription")
    assert worker.connections == 1, "re-subscribed without reconnecting"
    assert worker._consumers[0].channel is consumer.channel
    assert "worker.resubscribed" in {entry["event"] for entry in logs}
    await app.dispatch_async(OrderPlaced(order_id="after"))
    await eventually(lambda: seen == ["after"], 15, "the event after the cancel handled")
