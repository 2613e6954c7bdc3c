"""Slack alerts: one message per queue per interval, never in the collector's way.

The collector calls :meth:`Alerter.record` after each commit; that only adds
to in-memory counters. Every ``LETTERTHIEF_ALERT_INTERVAL`` seconds the
counters become one message per queue (the queue names the owning team),
sent at most one per second overall. A 429 waits its ``Retry-After``; an
unreachable webhook is logged and the message is kept and sent later, merged
with newer failures of the same queue, so the backlog stays one message per
queue. Nothing is sent when no webhook is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlencode

import httpx

from letterthief.metrics import Metrics
from letterthief.settings import LetterThiefSettings
from letterthief.store import Stored
from pigeon.logs import get_logger
from pigeon.settings import mask_url

log = get_logger("letterthief")

MIN_SPACING = 1.0
MAX_MESSAGE = 300
MAX_BACKOFF = 60.0


@dataclass
class QueueAlert:
    """Failures of one queue not yet announced."""

    queue: str
    count: int = 0
    events: Counter[str] = field(default_factory=Counter)
    exceptions: Counter[str] = field(default_factory=Counter)
    services: set[str] = field(default_factory=set)
    last_message: str = ""

    def add(self, s: Stored) -> None:
        self.count += 1
        self.events[s.event or "?"] += 1
        self.exceptions[s.exception_type or s.reason] += 1
        if s.service:
            self.services.add(s.service)
        if s.exception_message:
            self.last_message = s.exception_message

    def merge(self, other: QueueAlert) -> None:
        self.count += other.count
        self.events.update(other.events)
        self.exceptions.update(other.exceptions)
        self.services |= other.services
        self.last_message = other.last_message or self.last_message


def escape(text: str) -> str:
    """Slack's mrkdwn escaping: message content must not become links or mentions."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render(alert: QueueAlert, public_url: str, interval: float) -> dict[str, object]:
    """The webhook payload for one queue."""
    link = f"{public_url.rstrip('/')}/letters?{urlencode({'queue': alert.queue, 'status': 'open'})}"
    noun = "dead letter" if alert.count == 1 else "dead letters"
    team = f" (team: {escape(', '.join(sorted(alert.services)))})" if alert.services else ""
    events = ", ".join(f"`{escape(e)}` x{n}" for e, n in alert.events.most_common(5))
    exceptions = ", ".join(f"`{escape(e)}` x{n}" for e, n in alert.exceptions.most_common(3))
    lines = [
        f":rotating_light: *{alert.count} {noun}* in `{escape(alert.queue)}`{team} "
        f"in the last {interval:g}s",
        f"• event: {events}",
        f"• exception: {exceptions}",
    ]
    if alert.last_message:
        lines.append(f"• latest: {escape(truncate(alert.last_message))}")
    lines.append(f"<{link}|Open them in LetterThief>")
    return {"text": "\n".join(lines), "unfurl_links": False}


class Alerter:
    """Groups stored letters per queue and posts them to Slack in the background."""

    def __init__(
        self,
        settings: LetterThiefSettings,
        metrics: Metrics | None = None,
        *,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.webhook = settings.webhook
        self.metrics = metrics or Metrics()
        self.interval = settings.alert_interval
        self.pending: dict[str, QueueAlert] = {}
        self.outbox: dict[str, QueueAlert] = {}
        self._client = client
        self._owns_client = client is None
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._next_send = 0.0
        self._backoff = 1.0

    def record(self, stored: list[Stored]) -> None:
        """Count ``stored`` towards the next alerts; returns at once."""
        if not self.webhook:
            return
        for s in stored:
            alert = self.pending.get(s.queue)
            if alert is None:
                alert = self.pending[s.queue] = QueueAlert(s.queue)
            alert.add(s)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def close(self) -> None:
        if self._client is not None and self._owns_client:
            await self._client.aclose()
            self._client = None

    async def run(self) -> None:
        """Flush every interval and send what is due until :meth:`stop`."""
        if not self.webhook:
            log.info("alerts.disabled", note="set LETTERTHIEF_SLACK_WEBHOOK_URL to get alerts")
            return
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=10.0)
        loop = asyncio.get_running_loop()
        next_flush = loop.time() + self.interval
        while not self._stopping.is_set():
            now = loop.time()
            if now >= next_flush:
                self.flush()
                next_flush = now + self.interval
            if self.outbox and time.monotonic() >= self._next_send:
                await self._send_next()
                continue
            wake_at = next_flush
            if self.outbox:
                wake_at = min(wake_at, loop.time() + max(self._next_send - time.monotonic(), 0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wake_at - loop.time(), 0.01))

    def flush(self) -> None:
        """Move the interval's counters to the outbox, merging with unsent alerts."""
        pending, self.pending = self.pending, {}
        for queue, alert in pending.items():
            if queue in self.outbox:
                self.outbox[queue].merge(alert)
            else:
                self.outbox[queue] = alert

    async def _send_next(self) -> None:
        assert self._client is not None
        assert self.webhook is not None
        queue = next(iter(self.outbox))
        alert = self.outbox[queue]
        payload = render(alert, self.settings.public_url, self.interval)
        self._next_send = time.monotonic() + MIN_SPACING
        try:
            response = await self._client.post(self.webhook, json=payload)
        except httpx.HTTPError as exc:
            self._failed(queue, repr(exc))
            return
        if response.status_code == 429:
            retry_after = _seconds(response.headers.get("Retry-After"), default=MIN_SPACING)
            self._next_send = time.monotonic() + retry_after
            self.metrics.alerts.labels("rate-limited").inc()
            log.warning("alert.rate_limited", queue=queue, retry_after=retry_after)
            return
        if response.status_code >= 300:
            self._failed(queue, f"HTTP {response.status_code}: {response.text[:200]}")
            return
        self.outbox.pop(queue, None)
        self._backoff = 1.0
        self.metrics.alerts.labels("sent").inc()
        log.info("alert.sent", queue=queue, letters=alert.count)

    def _failed(self, queue: str, error: str) -> None:
        self.metrics.alerts.labels("failed").inc()
        log.error(
            "alert.failed",
            queue=queue,
            webhook=mask_url(self.webhook or ""),
            error=error,
            retry_in=self._backoff,
        )
        self._next_send = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)


def _seconds(value: str | None, *, default: float) -> float:
    try:
        return max(float(value), 0.0) if value is not None else default
    except ValueError:
        return default
