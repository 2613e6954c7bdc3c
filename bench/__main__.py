"""``python -m bench``: every benchmark, one table."""

from __future__ import annotations

import asyncio

from bench import consume, dispatch
from bench.common import quiet_logs, table


async def run_all() -> None:
    quiet_logs()
    rows = await dispatch.main()
    rows += await consume.main()
    print(table(rows))


if __name__ == "__main__":
    asyncio.run(run_all())
