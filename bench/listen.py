"""Consuming as users run it: ``pigeon listen`` with no flags against its peers' defaults.

Every contender is its own process, started the way its documentation says,
draining the same number of events pre-published to its own quorum queue:

- ``pigeon listen bench.listen_app:app``: no flags; configured from
  ``PIGEON_*`` (broker, service, and for the Redis and PostgreSQL rows the
  idempotency URL); run in an empty directory, so the SQLite store is the
  default ``.pigeon/idempotency.db`` there; logs JSON at INFO to a file.
- FastStream's default subscriber (``bench.peers faststream``), logging to a file.
- raw aio-pika at prefetch 100, ``json.loads`` and an ack per message.
- the broker's ceiling: pika consuming with auto-ack, nothing decoded; and
  pika publishing without confirms.

Each process reports, from its first message to its last, the rate and its
CPU time per message (all threads). Two rounds, every contender once per
round in turn; each figure is the fastest rate and the lowest CPU per message
of its two runs. The broker and the machine are shared, so the ratios are the
figures to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aio_pika

from bench.common import URL, bench_settings, delete, new_prefix, quiet_logs, table
from bench.listen_app import EVENT, build
from bench.orders import COUNT_ENV, QUEUE_ENV, RESULT_ENV, encode, items_for, order

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
DEADLINE = 300.0
ROUNDS = 2
LISTEN = "pigeon listen"
SIZES = {"order (5 items, 355 B)": 300, "1 KiB": 1024, "16 KiB": 16384}


@dataclass(frozen=True)
class Run:
    rate: float
    cpu_us: float


async def fill(queue: str, count: int, size: int) -> None:
    """Publish ``count`` orders of about ``size`` bytes into ``queue``, confirmed."""
    items = items_for(size)
    connection = await aio_pika.connect(URL)
    channel = await connection.channel(publisher_confirms=True)
    semaphore = asyncio.Semaphore(512)

    async def one(i: int) -> None:
        async with semaphore:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    encode(order(i, items)),
                    content_type="application/json",
                    message_id=str(uuid.uuid4()),
                    type=EVENT,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                queue,
            )

    await asyncio.gather(*(one(i) for i in range(count)))
    await connection.close()


async def measure(argv: list[str], env: dict[str, str], cwd: str, count: int) -> Run:
    """Start ``argv`` and wait for its meter's report; then stop it (SIGTERM)."""
    result = Path(cwd) / "result.json"
    env = {COUNT_ENV: str(count), RESULT_ENV: str(result), "PYTHONPATH": str(ROOT), **env}
    log = Path(cwd) / "consumer.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + DEADLINE
        while not result.exists():
            if proc.returncode is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{argv[2:]} exited {proc.returncode} or timed out:\n{tail}")
            await asyncio.sleep(0.05)
        report = json.loads(result.read_text())
        if proc.returncode is None:  # pika-publish ends by itself
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Run(report["rate"], report["cpu_us"])


def base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PIGEON_", "BENCH_"))}


async def pigeon(
    count: int, size: int, store_url: str | None = None, flags: tuple[str, ...] = ()
) -> Run:
    """``pigeon listen`` with no ``flags``, in an empty directory."""
    prefix = new_prefix()
    settings = bench_settings(prefix).model_copy(update={"service": prefix})
    app = build(settings)
    topology = app.topology()
    env = base_env() | {
        "PIGEON_URL": URL,
        "PIGEON_SERVICE": prefix,
        "PIGEON_EXCHANGE": settings.exchange,
        "PIGEON_DEAD_LETTER_EXCHANGE": settings.dead_letter_exchange,
        "PIGEON_DEAD_LETTER_QUEUE": settings.dead_letter_queue,
        "PIGEON_UNROUTED_EXCHANGE": settings.unrouted_exchange,
        "PIGEON_UNROUTED_QUEUE": settings.unrouted_queue,
    }
    if store_url is not None:
        env["PIGEON_IDEMPOTENCY_URL"] = store_url
    queue = app.find_listeners(())[0].queue
    try:
        await app.declare()
        await app.close()
        await fill(queue, count, size)
        with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
            argv = [sys.executable, "-m", "pigeon", "listen", "bench.listen_app:app", *flags]
            return await measure(argv, env, tmp, count)
    finally:
        connection = await aio_pika.connect(URL)
        await delete(
            connection, [q.name for q in topology.queues], [x.name for x in topology.exchanges]
        )
        await connection.close()
        if store_url is not None and store_url.startswith("redis"):
            await forget_redis_keys(queue)


async def peer(name: str, count: int, size: int) -> Run:
    """``python -m bench.peers NAME`` on a quorum queue of its own."""
    queue = f"{new_prefix()}.{name}"
    connection = await aio_pika.connect(URL)
    channel = await connection.channel()
    await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        if name != "pika-publish":
            await fill(queue, count, size)
        with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
            argv = [sys.executable, "-m", "bench.peers", name]
            return await measure(argv, base_env() | {QUEUE_ENV: queue}, tmp, count)
    finally:
        await channel.queue_delete(queue)
        await connection.close()


async def forget_redis_keys(queue: str) -> None:
    """The store's keys for ``queue`` (unique to one run): the bench leaves none behind."""
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"pigeon:idem:{queue}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        await client.delete(*keys[start : start + 1000])
    await client.aclose()


@contextlib.asynccontextmanager
async def postgres_database() -> Any:
    """A PostgreSQL database of its own for one run, dropped afterwards."""
    import asyncpg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{POSTGRES}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{POSTGRES}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def rows_for(label: str, mine: Run, peers: dict[str, Run]) -> list[tuple[str, str, str, str]]:
    """Rate rows (higher is better) and CPU rows (lower is better) against each peer."""
    rows = []
    for name, other in peers.items():
        rows.append(
            (
                f"{label} vs {name}",
                f"{mine.rate:,.0f}/s",
                f"{other.rate:,.0f}/s",
                f"{mine.rate / other.rate:.2f}x",
            )
        )
    for name, other in peers.items():
        if name.startswith("broker"):
            continue
        rows.append(
            (
                f"{label}, CPU per message vs {name}",
                f"{mine.cpu_us:.0f} µs",
                f"{other.cpu_us:.0f} µs",
                f"{mine.cpu_us / other.cpu_us:.2f}x",
            )
        )
    return rows


Contender = Callable[[int, int], Awaitable[Run]]


async def rounds(contenders: dict[str, Contender], n: int, size: int) -> dict[str, Run]:
    """:data:`ROUNDS` rounds, each contender once per round in turn; for each the fastest
    rate and the lowest CPU per message (the least disturbed by the neighbours)."""
    runs: dict[str, list[Run]] = {name: [] for name in contenders}
    for _ in range(ROUNDS):
        for name, contender in contenders.items():
            runs[name].append(await contender(n, size))
    return {
        name: Run(max(r.rate for r in rs), min(r.cpu_us for r in rs)) for name, rs in runs.items()
    }


async def run(count: int = 20_000) -> tuple[list[tuple[str, str, str, str]], float]:
    """The rows, and the broker's unconfirmed publish rate (the ceiling for dispatch)."""
    rows: list[tuple[str, str, str, str]] = []
    published = (await rounds({"publish": partial(peer, "pika-publish")}, count, 300))["publish"]
    rows.append(("broker ceiling: pika publish, no confirms", f"{published.rate:,.0f}/s", "", ""))
    async with postgres_database() as pg_url:
        for size_label, size in SIZES.items():
            contenders: dict[str, Contender] = {
                "broker ceiling": partial(peer, "pika-consume"),
                "aio-pika prefetch 100": partial(peer, "aio-pika"),
                "faststream default": partial(peer, "faststream"),
                "sqlite": pigeon,
            }
            if size == 300:
                contenders["redis"] = partial(pigeon, store_url=REDIS_URL)
                contenders["postgres"] = partial(pigeon, store_url=pg_url)
            got = await rounds(contenders, count if size < 16384 else count // 4, size)
            ceiling = got["broker ceiling"]
            rows.append(
                (
                    f"broker ceiling: pika auto-ack consume, {size_label}",
                    f"{ceiling.rate:,.0f}/s",
                    "",
                    "",
                )
            )
            peers = {name: got[name] for name in ("faststream default", "aio-pika prefetch 100")}
            peers["broker ceiling"] = ceiling
            for store in ("sqlite", "redis", "postgres"):
                if store in got:
                    rows += rows_for(f"{LISTEN} ({store}), {size_label}", got[store], peers)
    return rows, published.rate


async def main(count: int = 20_000) -> list[tuple[str, str, str, str]]:
    rows, _ = await run(count)
    return rows


if __name__ == "__main__":
    quiet_logs()
    print(table(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))))
