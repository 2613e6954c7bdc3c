"""A listener app run by ``pigeon listen`` in subprocess tests.

Configured entirely from the environment, as a real deployment would be:
``PIGEON_*`` for the bus, ``RECORDER_FILE`` where each handled message id is
appended, ``RECORDER_MODE`` for misbehaviour (``ok``, ``slow``, ``exit``,
``hang``, ``fail``; a payload's ``mode`` overrides it for that message) and
``RECORDER_SECONDS`` for ``slow``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pigeon import Context, Pigeon, Retry
from tests.apps.journal import journal

app = Pigeon()
_append = journal("RECORDER_FILE", "recorded.txt")
MODE = os.environ.get("RECORDER_MODE", "ok")
SECONDS = float(os.environ.get("RECORDER_SECONDS", "1"))


@app.listener(
    "test.order.placed",
    name="record",
    retry=Retry(attempts=2, delays=[0.2]),
    lease=float(os.environ.get("RECORDER_LEASE", "5")),
    delivery_limit=int(os.environ.get("RECORDER_DELIVERY_LIMIT", "20")),
    timeout=float(os.environ.get("RECORDER_TIMEOUT", "30")),
)
async def record(payload: dict[str, Any], ctx: Context) -> None:
    mode = payload.get("mode", MODE)
    if mode == "exit":
        _append(f"exit {ctx.message_id}")
        os._exit(3)
    _append(f"start {ctx.message_id}")
    if mode == "slow":
        await asyncio.sleep(SECONDS)
    elif mode == "hang":
        await asyncio.sleep(3600)
    _append(f"done {ctx.message_id}")
