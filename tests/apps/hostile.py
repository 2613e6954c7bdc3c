"""A listener app for the hostile-message and hard-crash tests, run by ``pigeon listen``.

Configured from the environment: ``HOSTILE_FILE`` where each step is
appended (``start ID ATTEMPT``, ``done ID``, ``fallback ID``, ``settled ID
KIND``), ``HOSTILE_LEASE`` the claim lease. A payload's ``mode`` decides:

- ``ok`` (default): handled;
- ``fail``: raises on every attempt (retried once, then fallback, then dead letter);
- ``freeze-retried`` / ``freeze-dead``: fails like ``fail``; once the retry
  copy (or the dead letter) of it is confirmed, the process freezes just
  before the ack (``settled ID KIND`` is written first), for the test to
  ``kill -9`` it at exactly that moment;
- ``hang``: hangs, when ``HOSTILE_HANG=1`` (the first process of a test); else handled.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pigeon import Context, Pigeon, Retry
from pigeon.acks import Acker
from pigeon.delivery import Delivery, Outcome
from pigeon.settle import Settler
from tests.apps.journal import journal

app = Pigeon()
_append = journal("HOSTILE_FILE", "hostile.txt")
HANG = os.environ.get("HOSTILE_HANG") == "1"


@app.listener(
    "test.#",
    name="record",
    retry=Retry(attempts=2, delays=[0.2]),
    lease=float(os.environ.get("HOSTILE_LEASE", "30")),
    delivery_limit=5,
)
async def record(payload: dict[str, Any], ctx: Context) -> None:
    mode = payload.get("mode", "ok")
    _append(f"start {ctx.message_id} {ctx.attempt}")
    if mode in ("fail", "freeze-retried", "freeze-dead"):
        raise RuntimeError(f"{mode} on purpose")
    if mode == "hang" and HANG:
        await asyncio.sleep(3600)
    _append(f"done {ctx.message_id}")


@record.fallback
async def gave_up(payload: dict[str, Any], ctx: Context, error: BaseException) -> None:
    _append(f"fallback {ctx.message_id}")


# -- freezing just before the ack (a test seam, installed only in this app) -----------

_freeze = False
_publish_outcome = Settler._publish_outcome
_ack = Acker.ack


async def _publish_then_mark(self: Settler, delivery: Delivery, outcome: Outcome) -> None:
    global _freeze
    await _publish_outcome(self, delivery, outcome)
    mode = delivery.payload.get("mode") if isinstance(delivery.payload, dict) else None
    if mode == f"freeze-{outcome.kind.value.removesuffix('_lettered')}":
        _append(f"settled {delivery.message_id} {outcome.kind.value}")
        _freeze = True


def _ack_unless_frozen(self: Acker, tag: int) -> None:
    if _freeze:
        time.sleep(3600)  # the whole process stops here, before the ack; the test kills it
    _ack(self, tag)


Settler._publish_outcome = _publish_then_mark  # type: ignore[method-assign]
Acker.ack = _ack_unless_frozen  # type: ignore[method-assign]
