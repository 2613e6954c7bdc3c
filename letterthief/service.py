"""One LetterThief: store, collector, replayer, alerter and retention, started together.

``letterthief serve`` starts it beside the web server; tests start it on
their own exchanges. :meth:`LetterThief.stop` stops the background tasks and
closes every connection, engine and client it opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from datetime import timedelta
from typing import Any

from letterthief.alerts import Alerter
from letterthief.collector import Collector
from letterthief.metrics import Metrics
from letterthief.replay import Jobs, Replayer
from letterthief.settings import LetterThiefSettings
from letterthief.store import Store
from pigeon.logs import get_logger
from pigeon.settings import Settings

log = get_logger("letterthief")

PURGE_EVERY = 3600.0


class LetterThief:
    def __init__(
        self, settings: LetterThiefSettings | None = None, pigeon: Settings | None = None
    ) -> None:
        self.settings = settings or LetterThiefSettings()
        self.pigeon = pigeon or Settings()
        self.metrics = Metrics()
        self.store = Store(self.settings.database_url)
        self.alerter = Alerter(self.settings, self.metrics)
        self.collector = Collector(
            self.store,
            self.pigeon,
            self.settings,
            metrics=self.metrics,
            on_stored=self.alerter.record,
        )
        self.replayer = Replayer(
            self.store,
            self.pigeon,
            batch_size=self.settings.replay_batch_size,
            timeout=self.settings.replay_timeout,
            metrics=self.metrics,
            max_edit_bytes=self.settings.max_edit_bytes,
        )
        self.jobs = Jobs()
        secret = self.settings.secret_key
        self.secret_key = secret.get_secret_value() if secret else secrets.token_urlsafe(32)
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()

    async def open(self) -> None:
        """Open the store (migrations); enough for the CLI's list/show/retry/archive."""
        await self.store.open()

    async def start(self, *, collect: bool = True) -> None:
        """Open the store and start the collector, the alerter and retention."""
        await self.open()
        if collect:
            self._tasks.append(asyncio.create_task(self.collector.run(), name="lt-collector"))
        self._tasks.append(asyncio.create_task(self.alerter.run(), name="lt-alerter"))
        self._tasks.append(asyncio.create_task(self._retention(), name="lt-retention"))

    async def stop(self) -> None:
        self._stopping.set()
        self.collector.stop()
        self.alerter.stop()
        for task in self._tasks:
            if task.get_name() == "lt-retention":
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await asyncio.wait_for(task, 20)
                except Exception as exc:
                    log.error("letterthief.stop_failed", task=task.get_name(), error=repr(exc))
        self._tasks.clear()
        await self.jobs.close()
        await self.replayer.close()
        await self.alerter.close()
        await self.store.close()

    async def __aenter__(self) -> LetterThief:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _retention(self) -> None:
        keep = timedelta(days=self.settings.retention_days)
        while not self._stopping.is_set():
            try:
                await self.store.purge(keep)
            except Exception as exc:
                log.error("store.purge_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), PURGE_EVERY)

    def status(self) -> dict[str, Any]:
        """What ``/healthz`` shows anyone: states only, no addresses, paths or users."""
        return {"collector": "consuming" if self.collector.ready.is_set() else "not consuming"}

    def health(self) -> dict[str, Any]:
        return {
            "collector": "consuming" if self.collector.ready.is_set() else "not consuming",
            "collector_error": self.collector.error,
            "store": self.store.masked_url,
            "broker": self.collector.connector.masked_url,
        }
