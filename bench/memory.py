"""Listener memory: how much ``pigeon listen``'s RSS grows over 200,000 events.

The listener is a real ``python -m pigeon listen bench.memory_app:app``
subprocess with default settings (SQLite idempotency in a temporary
directory, default concurrency), configured through ``PIGEON_*`` like any
deployment. Events are published with ``dispatch_many`` in chunks, never more
than :data:`BACKLOG` ahead of the listener. Its RSS (``/proc/<pid>/statm``) is
sampled once :data:`WARMUP` events are handled, when pools, caches and the
SQLite page cache have reached their working size, and again at the end: the
difference is what a long-running listener would keep accumulating.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import aio_pika

from bench.common import URL, bench_settings, delete, new_prefix, quiet_logs, table
from bench.memory_app import Tick, build

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20_000
CHUNK = 5_000
BACKLOG = 30_000
TARGET_MIB = 10.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib(pid: int) -> float:
    """Resident set size of process ``pid`` in MiB."""
    resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return resident * PAGE / 2**20


def handled(counter: Path) -> int:
    try:
        return int(counter.read_text() or 0)
    except FileNotFoundError:
        return 0


def tick(i: int) -> Tick:
    return Tick(seq=i, order_id=f"o-{i}", customer_email="a@example.com", total_cents=500 + i)


class Listener:
    """The ``pigeon listen`` subprocess and what it has handled so far."""

    def __init__(self, proc: asyncio.subprocess.Process, counter: Path, log: Path) -> None:
        self.proc = proc
        self.counter = counter
        self.log = log

    def handled(self) -> int:
        if self.proc.returncode is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"pigeon listen exited with {self.proc.returncode}:\n{tail}")
        return handled(self.counter)

    async def until(self, count: int, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while self.handled() < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"pigeon listen handled {self.handled()} of {count}")
            await asyncio.sleep(0.05)


async def main(count: int = 200_000) -> list[tuple[str, str, str, str]]:
    prefix = new_prefix()
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as tmp:
        settings = bench_settings(prefix).model_copy(
            update={
                "service": prefix,
                "idempotency_url": f"sqlite:///{tmp}/idem.db",
                "log_level": "WARNING",
            }
        )
        app = build(settings)
        topology = app.topology()
        env = {
            **os.environ,
            **{
                f"PIGEON_{name.upper()}": str(value)
                for name, value in settings.model_dump().items()
                if value is not None
            },
            "BENCH_MEMORY_COUNTER": f"{tmp}/handled",
        }
        log = Path(tmp) / "listen.log"
        try:
            await app.declare()
            with log.open("wb") as out:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "pigeon",
                    "listen",
                    "bench.memory_app:app",
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                )
            listener = Listener(proc, Path(tmp) / "handled", log)
            try:
                samples: dict[str, float] = {}

                async def sample() -> None:
                    await listener.until(WARMUP)
                    samples["warm"] = samples["peak"] = rss_mib(proc.pid)
                    while listener.handled() < count:
                        samples["peak"] = max(samples["peak"], rss_mib(proc.pid))
                        await asyncio.sleep(0.25)
                    samples["end"] = rss_mib(proc.pid)

                async def publish() -> None:
                    for start in range(0, count, CHUNK):
                        await listener.until(start - BACKLOG)
                        await app.dispatch_many(
                            tick(i) for i in range(start, min(start + CHUNK, count))
                        )

                await asyncio.gather(publish(), sample())
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.wait_for(proc.wait(), 60)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        finally:
            with contextlib.suppress(Exception):
                await app.close()
            connection = await aio_pika.connect(URL)
            await delete(
                connection,
                [q.name for q in topology.queues],
                [x.name for x in topology.exchanges],
            )
            await connection.close()
    warm, end, peak = samples["warm"], samples["end"], samples["peak"]
    growth = end - warm
    return [
        (
            f"listener RSS growth over {count // 1000}k events",
            f"{growth:+.1f} MiB ({warm:.1f} → {end:.1f}, peak {peak:.1f})",
            f"≤ {TARGET_MIB:.0f} MiB",
            "met" if growth <= TARGET_MIB else "missed",
        ),
        (
            "listener exit code on SIGTERM",
            str(code),
            "0",
            "met" if code == 0 else "missed",
        ),
    ]


if __name__ == "__main__":
    quiet_logs()
    print(table(asyncio.run(main())))
