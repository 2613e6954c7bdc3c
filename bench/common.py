"""What every benchmark shares: a broker URL, a throwaway topology, and timing."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aio_pika.abc import AbstractConnection

from pigeon.settings import Settings

URL = os.environ.get("PIGEON_BENCH_URL", "amqp://guest:guest@127.0.0.1:5672/")


def quiet_logs() -> None:
    """Production logging (JSON to stderr) at WARNING for every contender, so the
    figures compare message handling, not log volume."""
    from pigeon.logs import configure_logging

    configure_logging("json", "WARNING")


def bench_settings(prefix: str) -> Settings:
    return Settings(
        url=URL,
        exchange=f"{prefix}.events",
        dead_letter_exchange=f"{prefix}.dead",
        dead_letter_queue=f"{prefix}.dead-letters",
        unrouted_exchange=f"{prefix}.unrouted",
        unrouted_queue=f"{prefix}.unrouted",
        idempotency_url="memory://",
        log_format="json",
        log_level="WARNING",
    )


def new_prefix() -> str:
    return f"bench{uuid.uuid4().hex[:8]}"


async def quorum_sink(connection: AbstractConnection, exchange: str, queue: str, key: str) -> None:
    """A quorum queue bound to ``exchange`` (which must exist) so messages are really stored."""
    channel = await connection.channel()
    q = await channel.declare_queue(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await q.bind(exchange, key)
    await channel.close()


async def delete(connection: AbstractConnection, queues: list[str], exchanges: list[str]) -> None:
    channel = await connection.channel()
    for q in queues:
        await channel.queue_delete(q)
    for x in exchanges:
        await channel.exchange_delete(x)
    await channel.close()


@dataclass
class Rate:
    name: str
    per_second: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.per_second)


async def timed(count: int, run: Callable[[], Awaitable[None]]) -> float:
    started = time.perf_counter()
    await run()
    return count / (time.perf_counter() - started)


async def in_flight(count: int, limit: int, one: Callable[[int], Awaitable[object]]) -> None:
    """Run ``one(i)`` for ``count`` items with at most ``limit`` awaiting at once."""
    semaphore = asyncio.Semaphore(limit)

    async def guarded(i: int) -> None:
        async with semaphore:
            await one(i)

    await asyncio.gather(*(guarded(i) for i in range(count)))


def table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("figure", "pigeon", "peer", "ratio")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, sep, *body])
