"""A collector whose database commit never finishes, for the kill -9 test.

Run as ``python -m tests.letterthief.stuck_collector`` with ``PIGEON_*`` and
``LETTERTHIEF_*`` set; prints ``received`` once it holds a message it has not
stored, then waits to be killed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from letterthief.collector import Collector
from letterthief.parse import Received
from letterthief.settings import LetterThiefSettings
from letterthief.store import Store, Stored
from pigeon.settings import Settings


class StuckStore(Store):
    async def ingest(self, batch: Sequence[Received]) -> list[Stored]:
        print("received", flush=True)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def main() -> None:
    settings = LetterThiefSettings()
    store = StuckStore(settings.database_url)
    await store.open()
    collector = Collector(store, Settings(), settings)
    task = asyncio.create_task(collector.run())
    await collector.ready.wait()
    print("ready", flush=True)
    await task


if __name__ == "__main__":
    asyncio.run(main())
