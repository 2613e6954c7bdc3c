"""Keeping a claim alive while its holder works: the processor's idempotency claim and
:class:`~pigeon.middleware.WithoutOverlapping`'s lock are both leases in a store."""

from __future__ import annotations

import asyncio

from pigeon.idempotency.base import IdempotencyStore
from pigeon.logs import get_logger

log = get_logger("pigeon")


class Renewal:
    """Extends a claim every third of its lease while the handler runs.

    Most handlers finish well within a third of the lease, so nothing but a
    timer is created until a renewal is actually due.
    """

    __slots__ = ("_handle", "_task", "key", "lease", "store", "token")

    def __init__(self, store: IdempotencyStore, key: str, token: str, lease: float) -> None:
        self.store, self.key, self.token, self.lease = store, key, token, lease
        self._task: asyncio.Task[None] | None = None
        self._handle = asyncio.get_running_loop().call_later(lease / 3, self._start)

    def _start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.store.extend(self.key, self.token, self.lease)
            except Exception as exc:
                log.warning("idempotency.renew_failed", key=self.key, error=repr(exc))
            await asyncio.sleep(self.lease / 3)

    def stop(self) -> None:
        self._handle.cancel()
        if self._task is not None:
            self._task.cancel()
