"""A sync listener run by ``pigeon listen`` in subprocess tests (issue 14, item 6).

``RECORDER_FILE`` receives ``start ID`` and ``done ID`` lines; the handler
sleeps ``RECORDER_SECONDS`` in between, in the worker's thread pool. A
payload's ``seconds`` overrides it for that message.
"""

from __future__ import annotations

import os
import time
from typing import Any

from pigeon import Context, Pigeon
from tests.apps.journal import journal

app = Pigeon()
_append = journal("RECORDER_FILE", "recorded.txt")
SECONDS = float(os.environ.get("RECORDER_SECONDS", "20"))


@app.listener("test.order.placed", name="record-sync", lease=5)
def record_sync(payload: dict[str, Any], ctx: Context) -> None:
    _append(f"start {ctx.message_id}")
    time.sleep(float(payload.get("seconds", SECONDS)))
    _append(f"done {ctx.message_id}")
