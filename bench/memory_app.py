"""The service ``bench.memory`` runs under ``pigeon listen``: one listener that counts.

Configured from ``PIGEON_*`` like any service. ``BENCH_MEMORY_COUNTER`` names a
file that gets the number of handled events every :data:`EVERY` events, so the
benchmark can follow the listener without talking to it.
"""

from __future__ import annotations

import os

from pigeon import Event, Pigeon
from pigeon.settings import Settings

EVERY = 10_000


class Tick(Event, name="bench.memory.tick"):
    seq: int
    order_id: str
    customer_email: str
    total_cents: int


def write_atomically(path: str, text: str) -> None:
    """Readers see the old content or the new one, never a half-written file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(partial, path)


def build(settings: Settings | None = None) -> Pigeon:
    """The app for ``settings`` (the environment's by default)."""
    settings = settings or Settings()
    app = Pigeon(settings.service or "bench-memory", settings=settings)
    counter = os.environ.get("BENCH_MEMORY_COUNTER")
    handled = 0

    @app.listener(Tick)
    async def count(tick: Tick) -> None:
        nonlocal handled
        handled += 1
        if counter and handled % EVERY == 0:
            write_atomically(counter, str(handled))

    return app


app = build()
