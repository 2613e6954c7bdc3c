"""A three-node RabbitMQ cluster loses nodes under a producer and a listener.

The cluster is ``scripts/cluster.sh`` (pigeon1..3@localhost on 5701-5703),
started once per test run by the ``rabbit_cluster`` fixture. While events
flow, the node both clients use is killed with ``kill -9``, brought back, and
then the node leading the listener's quorum queue is stopped and brought back.
Every confirmed event must be handled exactly once from the handler's point
of view (re-published copies are absorbed by idempotency), by the same
listener process, and the worst dispatch latency is reported.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker, open_broker, unique_settings
from tests.procs import recorded, recorder, start_listener, stop, wait_for_log, wait_recorded
from tests.rabbit import CLUSTER_NODES, Node

pytestmark = pytest.mark.slow

EVENTS = 2400
PARALLEL = 8


@pytest.fixture
def settings(prefix: str, rabbit_cluster: str) -> Settings:
    return unique_settings(prefix, url=rabbit_cluster, url_shuffle=False, dispatch_timeout=90.0)


@pytest.fixture
async def broker(prefix: str, rabbit_cluster: str) -> AsyncIterator[Broker]:
    async with open_broker(prefix, CLUSTER_NODES[-1].url) as b:
        yield b


def node_on_port(port: int) -> Node:
    return next(node for node in CLUSTER_NODES if node.port == port)


def connected_node(log: Path) -> Node:
    """The node the listener connected to last (its ``broker.connected`` log line)."""
    urls = [
        entry["url"]
        for entry in map(_json, log.read_text().splitlines())
        if entry.get("event") == "broker.connected"
    ]
    port = re.search(r":(\d+)/", urls[-1])
    assert port is not None
    return node_on_port(int(port[1]))


def _json(line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


async def leader_of(queue: str) -> Node:
    """The node that leads ``queue`` now, asked of any node that is up."""
    for node in CLUSTER_NODES:
        if not node.is_up():
            continue
        out = await node.actl("list_queues", "-q", "--no-table-headers", "name", "leader")
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return next(n for n in CLUSTER_NODES if n.node == leader.strip())
    raise AssertionError(f"no node knows the leader of {queue}")


class Producer:
    """Dispatches events ``PARALLEL`` at a time, timing each confirm, until :meth:`finish`
    was called and at least ``EVENTS`` were confirmed."""

    def __init__(self, dispatch: Callable[..., Awaitable[str]]) -> None:
        self.dispatch = dispatch
        self.confirmed: list[str] = []
        self.latencies: list[float] = []
        self._sent = 0
        self._finishing = False

    async def run(self) -> None:
        await asyncio.gather(*(self._one_lane() for _ in range(PARALLEL)))

    def finish(self) -> None:
        self._finishing = True

    async def _one_lane(self) -> None:
        while not (self._finishing and self._sent >= EVENTS):
            self._sent += 1
            started = time.perf_counter()
            message_id = await self.dispatch("test.order.placed", {"n": self._sent})
            self.latencies.append(time.perf_counter() - started)
            self.confirmed.append(message_id)
            await asyncio.sleep(0.05)

    async def more(self, count: int, timeout: float = 120) -> None:
        """Wait until ``count`` more events were confirmed."""
        target = len(self.confirmed) + count
        deadline = time.monotonic() + timeout
        while len(self.confirmed) < target:
            assert time.monotonic() < deadline, f"{len(self.confirmed)}/{target} confirmed"
            await asyncio.sleep(0.05)


async def test_killing_and_stopping_cluster_nodes_loses_no_confirmed_event(
    make_app: AppFactory, broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = recorder(
        make_app,
        broker,
        tmp_path,
        PIGEON_URL_SHUFFLE="0",
        PIGEON_IDEMPOTENCY_URL=f"sqlite:///{tmp_path}/idem.db",
    )
    app, rec, env, log = setup.app, setup.rec, setup.env, setup.log
    queue = f"{app.service}.record"
    await app.declare([])
    proc = start_listener(env, "--concurrency", "20", log=log)
    pid = proc.pid
    try:
        wait_for_log(log, "worker.consuming", 60)
        producer = Producer(app.dispatch_async)
        producing = asyncio.create_task(producer.run())
        try:
            steps = await chaos(producer, log, queue, app.runtime().connector.url)
        finally:
            producer.finish()
        await asyncio.wait_for(producing, 300)
        await asyncio.to_thread(wait_recorded, rec, len(set(producer.confirmed)), "done", 120)
        handled = Counter(recorded(rec))
        assert set(producer.confirmed) <= set(handled), "0 confirmed events lost"
        assert max(handled.values()) == 1, "0 duplicate side effects"
        assert proc.poll() is None, "the listener survived every failure"
        assert proc.pid == pid
        assert log.read_text().count("broker.connection_lost") >= 1
    finally:
        assert stop(proc) == 0
        for node in CLUSTER_NODES:
            await asyncio.to_thread(node.start)
    figures = (
        f"cluster chaos: {len(producer.confirmed)} events confirmed, "
        f"{len(handled)} handled once, 0 lost, 0 duplicates; steps: {'; '.join(steps)}; "
        f"dispatch latency worst {max(producer.latencies) * 1000:.0f} ms, "
        f"p99 {sorted(producer.latencies)[int(len(producer.latencies) * 0.99)] * 1000:.0f} ms"
    )
    with capsys.disabled():
        print(f"\n{figures}")
    (tmp_path / "figures.txt").write_text(figures)


async def chaos(producer: Producer, log: Path, queue: str, producer_url: str) -> list[str]:
    """Kill the clients' node, bring it back, stop the queue leader's node, bring it back;
    events keep flowing through every step."""
    steps = []
    await producer.more(300)
    victim = connected_node(log)
    assert victim.url == producer_url, "both clients use the first node (no shuffle)"
    await asyncio.to_thread(victim.kill)
    steps.append(f"kill -9 {victim.name} at {len(producer.confirmed)}")
    await producer.more(200)
    await asyncio.to_thread(victim.start)
    steps.append(f"{victim.name} back at {len(producer.confirmed)}")
    await producer.more(200)
    leader = await leader_of(queue)
    await asyncio.to_thread(leader.stop)
    steps.append(f"stop leader {leader.name} at {len(producer.confirmed)}")
    await producer.more(200)
    assert await leader_of(queue) != leader, "the queue elected a new leader"
    await asyncio.to_thread(leader.start)
    steps.append(f"{leader.name} back at {len(producer.confirmed)}")
    await producer.more(200)
    return steps


async def members_of(queue: str) -> list[str]:
    out = await CLUSTER_NODES[0].actl("list_queues", "-q", "--no-table-headers", "name", "members")
    for line in out.splitlines():
        name, _, members = line.partition("\t")
        if name == queue:
            return re.findall(r"pigeon\d@localhost", members)
    raise AssertionError(f"no queue {queue}")


@pytest.mark.parametrize(("size", "members"), [(None, 3), (2, 2)])
async def test_quorum_queues_get_pigeon_quorum_size_members_all_three_by_default(
    make_app: AppFactory, broker: Broker, size: int | None, members: int
) -> None:
    app = make_app("sized")
    app.settings.quorum_size = size

    @app.listener("test.order.placed")
    async def record(payload: dict[str, Any]) -> None: ...

    await app.declare()
    assert len(await members_of(record.queue)) == members
    assert len(await members_of(app.settings.dead_letter_queue)) == members


async def test_a_frozen_node_costs_a_dispatch_seconds_not_its_whole_timeout(
    make_app: AppFactory, broker: Broker
) -> None:
    """A node that stops answering without closing its sockets (a partition, a hung VM):
    the dispatch waiting on it gives the node up and is confirmed through the next one
    long before its 90 s dispatch timeout. (A queue led by the frozen node accepts again
    once the others wrote it off: ``net_ticktime``, 10 s on this cluster.)"""
    app = make_app("frozen")
    await app.declare([])
    await app.dispatch_async("test.order.placed", {"n": 0})
    node = node_on_port(int(re.findall(r":(\d+)/", app.runtime().connector.url)[0]))
    pid = await asyncio.to_thread(node.freeze)
    try:
        message_id = await asyncio.wait_for(app.dispatch_async("test.order.placed", {"n": 1}), 45)
        assert message_id
        assert app.runtime().connector.url != node.url
    finally:
        node.thaw(pid)
        await app.close()
        # The others wrote the frozen node off (net_ticktime): a partition that a
        # restart of that node heals.
        await asyncio.to_thread(node.stop)
        await asyncio.to_thread(node.start)


async def test_a_listener_on_a_frozen_node_moves_to_another_and_keeps_handling(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    """The listener's node hangs: the short cluster heartbeat notices, the listener
    reconnects to another node and handles what is dispatched meanwhile, same process."""
    setup = recorder(make_app, broker, tmp_path)
    app, rec, env, log = setup.app, setup.rec, setup.env, setup.log
    await app.declare([])
    proc = start_listener(env, log=log)
    wait_for_log(log, "worker.consuming", 60)
    node = connected_node(log)
    others = [n for n in CLUSTER_NODES if n != node]
    app.settings.url = ",".join(n.url for n in others)  # the producer avoids the frozen node
    pid = await asyncio.to_thread(node.freeze)
    try:
        sent = [await app.dispatch_async("test.order.placed", {"n": i}) for i in range(20)]
        await asyncio.to_thread(wait_recorded, rec, 20, "done", 90)
        assert set(recorded(rec)) == set(sent)
        assert connected_node(log) != node
        assert proc.poll() is None
    finally:
        node.thaw(pid)
        assert stop(proc) == 0
        await app.close()
        await asyncio.to_thread(node.stop)  # heal the partition
        await asyncio.to_thread(node.start)
