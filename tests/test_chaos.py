"""Processes die and brokers restart; every event is still handled.

These tests stop, restart and even reset a broker, so they run against their
own private node (``pigeonchaos@localhost`` on port 5721, started by
``scripts/rabbit-node.sh`` once for this module and wiped after it), never the
machine's node. They are marked slow; CI runs them like every other test.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pigeon import Pigeon, headers
from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker, open_broker, unique_settings
from tests.procs import (
    env_for,
    recorded,
    recorder,
    start_listener,
    stop,
    wait_for_log,
    wait_recorded,
)
from tests.rabbit import CHAOS_NODE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def chaos_node() -> Iterator[str]:
    """This module's own RabbitMQ node; its URL. Wiped when the module is done."""
    CHAOS_NODE.start()
    try:
        yield CHAOS_NODE.url
    finally:
        CHAOS_NODE.wipe()


@pytest.fixture
def settings(prefix: str, chaos_node: str) -> Settings:
    return unique_settings(prefix, url=chaos_node)


@pytest.fixture
async def broker(prefix: str, chaos_node: str) -> AsyncIterator[Broker]:
    async with open_broker(prefix, chaos_node) as b:
        yield b


async def restart_broker(reset: bool = False, down_for: float = 2.0) -> None:
    """Stop the private node's RabbitMQ application (and wipe it), then start it again."""
    await CHAOS_NODE.actl("stop_app")
    if reset:
        await CHAOS_NODE.actl("reset")
    await asyncio.sleep(down_for)
    await CHAOS_NODE.actl("start_app")
    await CHAOS_NODE.actl("await_startup")


@dataclass
class CrashLoop:
    """A poison message crash-looping a supervised listener among ``good`` messages."""

    app: Pigeon
    rec: Path
    proc: subprocess.Popen[bytes]
    restarts: int
    poison: str
    good: list[str]


async def crash_loop(
    make_app: AppFactory, broker: Broker, tmp_path: Path, neighbours: int
) -> CrashLoop:
    """One listener (concurrency 1, delivery limit 2) gets a message that kills its process,
    then ``neighbours`` good ones. It is started again whenever it dies (as supervisor does)
    until the good ones are handled and a dead letter is waiting. The caller stops
    ``proc``."""
    setup = recorder(
        make_app,
        broker,
        tmp_path,
        RECORDER_DELIVERY_LIMIT="2",
        PIGEON_IDEMPOTENCY_URL=f"sqlite:///{tmp_path}/idem.db",
    )
    app, rec, env, log = setup.app, setup.rec, setup.env, setup.log
    await app.declare([])
    proc = start_listener(env, "--concurrency", "1", log=log)  # prefetch 10
    wait_for_log(log, "worker.consuming")
    poison = await app.dispatch_async("test.order.placed", {"mode": "exit"})
    good = [await app.dispatch_async("test.order.placed", {"n": i}) for i in range(neighbours)]
    restarts = 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert proc.returncode == 3
            restarts += 1
            proc = start_listener(env, "--concurrency", "1", log=log)
        elif len(recorded(rec)) >= neighbours and await broker.count(
            app.settings.dead_letter_queue
        ):
            break
        await asyncio.sleep(0.1)
    # a SIGTERM during start-up (before the handler is installed) is a death by signal:
    # stop the last process only once it is consuming
    while log.read_text().count("worker.consuming") <= restarts and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return CrashLoop(app, rec, proc, restarts, poison, good)


async def assert_only_the_poison_was_dead_lettered(loop: CrashLoop, broker: Broker) -> Any:
    """Every good message was handled, the poison is the dead letter; that letter."""
    assert sorted(recorded(loop.rec)) == sorted(loop.good), "every neighbour was handled"
    letter = await broker.get(loop.app.settings.dead_letter_queue, timeout=30)
    assert letter.message_id == loop.poison
    return letter


async def test_a_handler_that_kills_its_process_is_dead_lettered_by_the_delivery_limit(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    loop = await crash_loop(make_app, broker, tmp_path, neighbours=3)
    try:
        letter = await assert_only_the_poison_was_dead_lettered(loop, broker)
        deaths = letter.headers[headers.X_DEATH]
        assert isinstance(deaths, list)
        death = deaths[0]
        assert isinstance(death, dict)
        assert death["reason"] == "delivery_limit"
        assert death["queue"] == f"{loop.app.service}.record"
        assert 2 <= loop.restarts <= 4
        assert len(recorded(loop.rec, "exit")) == loop.restarts
    finally:
        assert stop(loop.proc) == 0


async def test_kill_minus_nine_in_the_middle_loses_nothing(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(
        make_app,
        broker,
        tmp_path,
        RECORDER_MODE="slow",
        RECORDER_SECONDS="0.01",
        RECORDER_LEASE="2",
        PIGEON_IDEMPOTENCY_URL=f"sqlite:///{tmp_path}/idem.db",
    )
    app, rec, env = setup.app, setup.rec, setup.env
    log = tmp_path / "listen.log"
    await app.declare([])
    proc = start_listener(env, "--concurrency", "20", log=log)
    wait_for_log(log, "worker.consuming")
    ids = await asyncio.gather(
        *(app.dispatch_async("test.order.placed", {"n": i}) for i in range(1000))
    )
    wait_recorded(rec, 300, timeout=60)
    proc.kill()
    proc.wait()
    killed_at = len(recorded(rec))
    proc = start_listener(env, "--concurrency", "20", log=log)
    try:
        wait_recorded(rec, 1000, timeout=120)
        await asyncio.sleep(3)  # claims of the killed process expire; late duplicates would show
        done = recorded(rec)
        assert set(done) == set(ids), "every event handled"
        duplicates = len(done) - len(set(done))
        assert duplicates <= 20, f"duplicates bounded by in-flight work, got {duplicates}"
        assert 300 <= killed_at < 1000
    finally:
        assert stop(proc) == 0
    (tmp_path / "figures.txt").write_text(f"sent=1000 handled={len(set(done))} dup={duplicates}")


async def test_the_broker_restarting_under_a_producer_and_a_listener_loses_nothing(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(
        make_app,
        broker,
        tmp_path,
        PIGEON_IDEMPOTENCY_URL=f"sqlite:///{tmp_path}/idem.db",
    )
    app, rec, env = setup.app, setup.rec, setup.env
    app.settings.dispatch_timeout = 90
    log = tmp_path / "listen.log"
    proc = start_listener(env, log=log)
    wait_for_log(log, "worker.consuming")
    ids: list[str] = []

    async def produce() -> None:
        for i in range(300):
            ids.append(await app.dispatch_async("test.order.placed", {"n": i}))
            await asyncio.sleep(0.01)

    producer = asyncio.create_task(produce())
    await asyncio.sleep(0.8)
    await restart_broker()
    await asyncio.wait_for(producer, 120)  # no DispatchError within the dispatch timeout
    try:
        wait_recorded(rec, 300, timeout=90)
        assert set(recorded(rec)) == set(ids)
        assert len(ids) == 300
        assert proc.poll() is None, "the listener resumed by itself"
        assert "broker.connection_lost" in log.read_text()
    finally:
        assert stop(proc) == 0
    await app.close()
    await broker.reconnect()


async def test_a_fresh_empty_broker_gets_its_topology_back_and_events_flow(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    app = make_app("recorder")
    app.settings.dispatch_timeout = 90
    rec = tmp_path / "rec.txt"
    log = tmp_path / "listen.log"
    env = env_for(app.settings, app.service or "", RECORDER_FILE=str(rec))
    broker.queues.add(f"{app.service}.record")
    proc = start_listener(env, log=log)
    try:
        wait_for_log(log, "worker.consuming")
        before = await app.dispatch_async("test.order.placed", {"n": 0})
        wait_recorded(rec, 1)
        await restart_broker(reset=True)
        # The producer's cached exchange is gone with the reset: it must re-declare. Until
        # the listener has re-declared its queue, events have no queue: they are kept.
        early = await app.dispatch_async("test.order.placed", {"n": 1})
        await asyncio.to_thread(wait_for_log, log, 'generation": 2', 60)
        await asyncio.to_thread(_wait_for_second_consuming, log)
        later = [await app.dispatch_async("test.order.placed", {"n": i}) for i in range(2, 22)]
        deadline = time.monotonic() + 90
        while not set(later) <= set(recorded(rec)) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # a duplicate would show up now
        handled = Counter(recorded(rec))
        assert handled[before] == 1
        assert all(handled[m] == 1 for m in later), "every later dispatch handled once"
        await broker.reconnect()
        if handled[early] == 0:
            kept = await broker.get(app.settings.unrouted_queue)
            assert kept.message_id == early, "an event nobody could take yet was kept"
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
    await app.close()


def _wait_for_second_consuming(log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text().count("worker.consuming") < 2:
        if time.monotonic() > deadline:
            raise AssertionError("the listener did not consume again after the reset")
        time.sleep(0.1)


async def test_a_crashing_poison_message_does_not_drag_its_prefetched_neighbours_to_the_limit(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    """Each crash counts a delivery against every unacked message; with a prefetch of ten,
    the poison's neighbours would reach the limit with it. The slow start after a crash
    takes the redelivered messages one at a time, so only the poison is dead-lettered."""
    loop = await crash_loop(make_app, broker, tmp_path, neighbours=8)
    try:
        await assert_only_the_poison_was_dead_lettered(loop, broker)
        assert await broker.count(loop.app.settings.dead_letter_queue) == 0, "only the poison"
    finally:
        assert stop(loop.proc) == 0


async def test_max_messages_exits_zero_after_exactly_n(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    setup = recorder(make_app, broker, tmp_path)
    app, rec, env = setup.app, setup.rec, setup.env
    queue = f"{app.service}.record"
    broker.queues.add(queue)
    await app.declare([])
    proc = start_listener(env, "--max-messages", "5", "--concurrency", "3", log=tmp_path / "l.log")
    wait_for_log(tmp_path / "l.log", "worker.consuming")
    for i in range(12):
        await app.dispatch_async("test.order.placed", {"n": i})
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert len(recorded(rec)) == 5
    await asyncio.sleep(0.5)
    assert await broker.count(queue) == 7
    assert "max-messages" in (tmp_path / "l.log").read_text()
    await app.close()
