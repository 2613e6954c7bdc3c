"""``python -m bench``: every benchmark, one table."""

from __future__ import annotations

import asyncio

from bench import dispatch
from bench.common import table


async def run_all() -> None:
    rows = await dispatch.main()
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(run_all())
