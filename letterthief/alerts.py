"""Slack alerts: one message per queue per interval, never in the collector's way.

The collector calls :meth:`Alerter.record` after each commit; that only adds
to in-memory counters. Every ``LETTERTHIEF_ALERT_INTERVAL`` seconds the
counters become one message per queue (the queue names the owning team),
sent at most one per second overall; when more than
``LETTERTHIEF_ALERT_MAX_QUEUES`` queues failed in one interval they become one
summary post instead. A 429 waits its ``Retry-After``; an unreachable webhook
or a 5xx is logged and that queue's message is kept and sent later (its own
backoff), merged with newer failures of the same queue, so the backlog stays
one message per queue and one queue's trouble never holds up another's. A
permanent refusal (4xx other than 429) parks the message: it is dropped with
a log line and the ``parked`` metric, never retried. Logs name the webhook's
host only: its path is the secret. Nothing is sent without a webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

import httpx

from letterthief.metrics import Metrics
from letterthief.settings import LetterThiefSettings
from letterthief.store import Stored
from pigeon.logs import get_logger

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
    queues: Counter[str] = field(default_factory=Counter)
    """For the summary post: letters per queue."""
    retry_at: float = 0.0
    backoff: float = 1.0

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
        self.queues.update(other.queues or {other.queue: other.count})


def escape(text: str) -> str:
    """Slack's mrkdwn escaping: message content must not become links or mentions."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def truncate(text: str, limit: int = MAX_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


SUMMARY = "*"
"""The outbox key of the summary post (no queue is named ``*``)."""


def render_summary(alert: QueueAlert, public_url: str, interval: float) -> dict[str, object]:
    """One post for many queues failing at once."""
    link = f"{public_url.rstrip('/')}/letters?{urlencode({'status': 'open'})}"
    queues = ", ".join(f"`{escape(q)}` x{n}" for q, n in alert.queues.most_common(15))
    more = len(alert.queues) - 15
    exceptions = ", ".join(f"`{escape(e)}` x{n}" for e, n in alert.exceptions.most_common(3))
    lines = [
        f":rotating_light: *{alert.count} dead letters* in *{len(alert.queues)} queues* "
        f"in the last {interval:g}s",
        f"• queues: {queues}" + (f" and {more} more" if more > 0 else ""),
        f"• exception: {exceptions}",
        f"<{link}|Open them in LetterThief>",
    ]
    return {"text": "\n".join(lines), "unfurl_links": False}


def render(alert: QueueAlert, public_url: str, interval: float) -> dict[str, object]:
    """The webhook payload for one queue (or the summary of many)."""
    if alert.queue == SUMMARY:
        return render_summary(alert, public_url, interval)
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
        self.webhook_host = urlsplit(self.webhook or "").hostname or "?"

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
            due = self._due_at()
            if due is not None and time.monotonic() >= due:
                await self._send_next()
                continue
            wake_at = next_flush
            if due is not None:
                wake_at = min(wake_at, loop.time() + max(due - time.monotonic(), 0))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(wake_at - loop.time(), 0.01))

    def flush(self) -> None:
        """Move the interval's counters to the outbox, merging with unsent alerts;
        more than ``alert_max_queues`` queues at once are merged into one summary."""
        pending, self.pending = self.pending, {}
        if len(pending) > self.settings.alert_max_queues:
            summary = self.outbox.setdefault(SUMMARY, QueueAlert(SUMMARY))
            for alert in pending.values():
                summary.merge(alert)
            return
        for queue, alert in pending.items():
            if queue in self.outbox:
                self.outbox[queue].merge(alert)
            else:
                self.outbox[queue] = alert

    def _due_at(self) -> float | None:
        """When the next alert may go (monotonic), or ``None`` with nothing to send."""
        if not self.outbox:
            return None
        return max(self._next_send, min(a.retry_at for a in self.outbox.values()))

    def _due(self) -> str | None:
        """The first queue whose alert may be sent now (each has its own backoff)."""
        now = time.monotonic()
        return next((q for q, a in self.outbox.items() if a.retry_at <= now), None)

    async def _send_next(self) -> None:
        assert self._client is not None
        assert self.webhook is not None
        queue = self._due()
        if queue is None:
            return
        alert = self.outbox[queue]
        payload = render(alert, self.settings.public_url, self.interval)
        self._next_send = time.monotonic() + MIN_SPACING
        try:
            response = await self._client.post(self.webhook, json=payload)
        except httpx.HTTPError as exc:  # its text may hold the URL: the type is enough
            self._failed(alert, type(exc).__name__)
            return
        status = response.status_code
        if status == 429:
            retry_after = _seconds(response.headers.get("Retry-After"), default=MIN_SPACING)
            self._next_send = time.monotonic() + retry_after
            self.metrics.alerts.labels("rate-limited").inc()
            log.warning("alert.rate_limited", queue=queue, retry_after=retry_after)
            return
        if 400 <= status < 500:
            self.outbox.pop(queue, None)
            self.metrics.alerts.labels("parked").inc()
            log.error(
                "alert.parked",
                queue=queue,
                letters=alert.count,
                webhook=self.webhook_host,
                status=status,
                note="the webhook refused this alert for good; it is not retried",
            )
            return
        if status >= 300:
            self._failed(alert, f"HTTP {status}")
            return
        self.outbox.pop(queue, None)
        self.metrics.alerts.labels("sent").inc()
        log.info("alert.sent", queue=queue, letters=alert.count)

    def _failed(self, alert: QueueAlert, error: str) -> None:
        self.metrics.alerts.labels("failed").inc()
        log.error(
            "alert.failed",
            queue=alert.queue,
            webhook=self.webhook_host,
            error=error,
            retry_in=alert.backoff,
        )
        alert.retry_at = time.monotonic() + alert.backoff
        alert.backoff = min(alert.backoff * 2, MAX_BACKOFF)


def _seconds(value: str | None, *, default: float) -> float:
    try:
        return max(float(value), 0.0) if value is not None else default
    except ValueError:
        return default
