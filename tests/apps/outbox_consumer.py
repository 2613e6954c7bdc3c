"""A listener with an inbox, run by ``pigeon listen`` in the outbox kill tests.

``OUTBOX_TEST_DB`` is the database (a sync SQLAlchemy URL), ``OUTBOX_TEST_PREFIX``
names this run's tables: outbox ``ob_<prefix>``, inbox ``ib_<prefix>`` and the
effects table ``fx_<prefix>``, one row per handled event (no unique constraint:
a second effect of one message would show as a second row).
"""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import create_engine, insert

from pigeon import Context, Pigeon
from pigeon.outbox import Outbox
from tests.outbox_support import effects_table

PREFIX = os.environ.get("OUTBOX_TEST_PREFIX", "local")
engine = create_engine(os.environ.get("OUTBOX_TEST_DB", "sqlite:///outbox-consumer.db"))
outbox = Outbox(
    engine,
    table=f"ob_{PREFIX}",
    inbox_table=f"ib_{PREFIX}",
    lease=float(os.environ.get("OUTBOX_TEST_LEASE", "60")),
)
metadata, effects = effects_table(PREFIX)
app = Pigeon()


@app.listener("outbox.test.shipped", name="apply", outbox=outbox)
def apply(payload: dict[str, Any], ctx: Context) -> None:
    ctx.session.execute(insert(effects).values(message_id=ctx.message_id, seq=payload["seq"]))
