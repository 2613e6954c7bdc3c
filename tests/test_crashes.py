"""Hard crashes: a ``kill -9`` at the worst moment neither re-runs a finished outcome nor
stalls the restarted worker for the dead process's lease."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pigeon import Context
from pigeon.idempotency.memory import MemoryStore
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.hostile import Hostile
from tests.procs import stop, wait_for_log, wait_recorded


async def _killed_before_the_ack_of(
    hostile: Hostile, broker: Broker, mode: str, message_id: str
) -> None:
    """Dispatch a failing ``mode`` message, kill -9 the listener right before the ack
    of its retry copy or dead letter, and start a fresh listener."""
    first = hostile.start()
    wait_for_log(hostile.log, "worker.consuming")
    await hostile.app.dispatch_async("test.order.placed", {"mode": mode}, message_id=message_id)
    wait_recorded(hostile.rec, 1, kind="settled")
    first.kill()
    first.wait(10)


async def test_a_crash_before_the_ack_of_a_dead_letter_does_not_run_the_fallback_again(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    hostile = Hostile(make_app, broker, tmp_path)
    await _killed_before_the_ack_of(hostile, broker, "freeze-dead", "dead-1")
    assert hostile.lines("fallback") == ["dead-1"]
    second = hostile.start()
    try:
        wait_for_log(hostile.log, '"outcome": "duplicate"')
        await hostile.app.dispatch_async("test.order.placed", {}, message_id="after")
        wait_recorded(hostile.rec, 1, kind="done")
        assert await broker.count(hostile.queue) == 0
    finally:
        assert stop(second) == 0
    assert hostile.lines("fallback") == ["dead-1"], "the fallback ran once"
    assert hostile.lines("start") == ["dead-1 1", "dead-1 2", "after 1"]
    assert await broker.count(hostile.app.settings.dead_letter_queue) == 1, "one dead letter"
    await hostile.app.close()


async def test_a_crash_before_the_ack_of_a_retry_copy_does_not_run_that_attempt_again(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    hostile = Hostile(make_app, broker, tmp_path)
    await _killed_before_the_ack_of(hostile, broker, "freeze-retried", "retry-1")
    second = hostile.start()
    try:
        wait_recorded(hostile.rec, 1, kind="fallback")
        wait_for_log(hostile.log, '"outcome": "duplicate"')
        assert await broker.wait_count(hostile.app.settings.dead_letter_queue, 1) == 1
    finally:
        assert stop(second) == 0
    assert hostile.lines("start") == ["retry-1 1", "retry-1 2"], "each attempt ran once"
    assert hostile.lines("fallback") == ["retry-1"]
    await hostile.app.close()


async def test_a_restart_after_kill_9_takes_over_the_dead_process_claims_at_once(
    make_app: AppFactory, broker: Broker, tmp_path: Path
) -> None:
    hostile = Hostile(make_app, broker, tmp_path)
    first = hostile.start(HOSTILE_HANG="1", HOSTILE_LEASE="120")
    wait_for_log(hostile.log, "worker.consuming")
    ids = await hostile.app.dispatch_many(
        [("test.order.placed", {"mode": "hang"}) for _ in range(5)]
    )
    wait_recorded(hostile.rec, 5, kind="start")
    first.kill()
    first.wait(10)
    second = hostile.start(HOSTILE_LEASE="120")
    try:
        # Far less than the 120 s lease: the dead holder's claims are not waited for.
        done = wait_recorded(hostile.rec, 5, kind="done", timeout=30)
        assert sorted(done) == sorted(ids)
        wait_for_log(hostile.log, "idempotency.dead_holder_released")
    finally:
        assert stop(second) == 0
    await hostile.app.close()


async def test_a_delivery_waiting_for_another_process_claim_gives_up_its_slot(
    make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("slots")
    handled: list[str] = []

    @app.listener("test.order.placed", lease=60)
    async def handle(payload: dict[str, str], ctx: Context) -> None:
        handled.append(ctx.message_id)

    store = MemoryStore()
    elsewhere = await store.claim(f"{handle.queue}:held", lease=60)  # a live holder: us
    await run_worker(app, concurrency=1, prefetch=4, store=store)
    await app.dispatch_async("test.order.placed", {}, message_id="held")
    await app.dispatch_async("test.order.placed", {}, message_id="free")
    await eventually(lambda: handled == ["free"], timeout=10)
    assert elsewhere.token is not None
    await store.release(f"{handle.queue}:held", elsewhere.token)
    await eventually(lambda: handled == ["free", "held"], timeout=10)
    await asyncio.sleep(0)
