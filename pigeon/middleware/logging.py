"""``Logging``: one log line per handler call."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pigeon.logs import get_logger

if TYPE_CHECKING:
    from pigeon.core.processor import Delivery
    from pigeon.middleware.base import CallNext


class Logging:
    """Logs each handler call: ``handler.started`` (debug) and ``handler.finished`` with
    ``duration_ms`` and the error, if any. The worker's ``message.handled`` line (the
    final outcome) is logged either way."""

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        ctx = delivery.context
        log = ctx.log if ctx is not None else get_logger("pigeon")
        log.debug("handler.started")
        started = time.perf_counter()
        try:
            await call_next(delivery)
        except BaseException as exc:
            log.warning(
                "handler.finished",
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                error=repr(exc),
            )
            raise
        log.info("handler.finished", duration_ms=round((time.perf_counter() - started) * 1000, 2))
