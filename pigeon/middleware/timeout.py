"""``Timeout``: a limit on the rest of the chain."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pigeon.errors import ConfigurationError, HandlerTimeout

if TYPE_CHECKING:
    from pigeon.core.processor import Delivery
    from pigeon.middleware.base import CallNext


class Timeout:
    """Cancels the rest of the chain after ``seconds``; the message then fails with
    reason ``timeout`` like a listener's own ``timeout=``."""

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ConfigurationError(f"Timeout(seconds) must be positive, got {seconds!r}")
        self.seconds = seconds

    async def __call__(self, delivery: Delivery, call_next: CallNext) -> None:
        try:
            async with asyncio.timeout(self.seconds) as scope:
                await call_next(delivery)
        except TimeoutError as exc:
            if not scope.expired():
                raise
            raise HandlerTimeout(
                f"{delivery.listener.name} ran longer than Timeout({self.seconds:g})"
            ) from exc
