"""Slack alerts against a local HTTP server that records what it is sent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from letterthief.alerts import Alerter
from letterthief.service import LetterThief
from letterthief.store import Stored
from pigeon import Retry
from pigeon.settings import Settings
from tests.conftest import AppFactory, RunWorker, eventually
from tests.letterthief.conftest import SlackStandIn, lt_settings


def stored(queue: str, *, exc: str = "ValueError", message: str = "boom") -> Stored:
    return Stored(
        1, queue, "order.placed", queue.split(".")[0], "handler-error", exc, message,
        datetime.now(UTC),
    )  # fmt: skip


@pytest.fixture
async def start_alerter(
    slack: SlackStandIn, tmp_path: Path
) -> AsyncIterator[Callable[..., Alerter]]:
    running: list[tuple[Alerter, asyncio.Task[None]]] = []

    def start(**overrides: object) -> Alerter:
        values: dict[str, object] = {"slack_webhook_url": slack.url, "alert_interval": 0.2}
        values.update(overrides)
        alerter = Alerter(lt_settings(f"sqlite:///{tmp_path / 'unused.db'}", **values))
        running.append((alerter, asyncio.create_task(alerter.run())))
        return alerter

    yield start
    for alerter, task in running:
        alerter.stop()
        await asyncio.wait_for(task, 10)
        await alerter.close()


async def test_alerts_are_grouped_per_queue_and_name_what_failed(
    start_alerter: Callable[..., Alerter], slack: SlackStandIn
) -> None:
    alerter = start_alerter()
    alerter.record([stored("billing.charge") for _ in range(3)])
    alerter.record([stored("mail.send", exc="KeyError", message="'email' <@channel> " + "x" * 900)])
    await eventually(lambda: len(slack.posts) == 2, timeout=10)
    billing, mail = sorted(slack.texts(), key=lambda t: "mail.send" in t)
    assert "*3 dead letters* in `billing.charge`" in billing
    assert "team: billing" in billing
    assert "`order.placed` x3" in billing
    assert "`ValueError` x3" in billing
    assert "boom" in billing
    assert "http://letterthief.test/letters?queue=billing.charge&status=open" in billing
    assert "*1 dead letter* in `mail.send`" in mail
    assert "&lt;@channel&gt;" in mail  # content cannot ping anyone or make links
    assert len(mail) < 800  # the exception message is truncated
    assert slack.times[1] - slack.times[0] >= 0.95  # one message per second at most


async def test_a_rate_limited_alert_waits_for_retry_after(
    start_alerter: Callable[..., Alerter], slack: SlackStandIn
) -> None:
    slack.responses.append((429, {"Retry-After": "2"}))
    started = time.monotonic()
    alerter = start_alerter()
    alerter.record([stored("billing.charge")])
    await eventually(lambda: len(slack.posts) == 1, timeout=10)
    assert slack.times[0] - started >= 2.0
    assert "billing.charge" in slack.texts()[0]


async def test_a_webhook_that_is_down_gets_the_alert_later_merged_with_newer_failures(
    start_alerter: Callable[..., Alerter], slack: SlackStandIn
) -> None:
    slack.responses += [(503, {}), (503, {})]
    alerter = start_alerter()
    alerter.record([stored("billing.charge")])
    await eventually(lambda: not slack.responses, timeout=10)  # both failures answered
    alerter.record([stored("billing.charge"), stored("billing.charge")])
    await eventually(lambda: len(slack.posts) == 1, timeout=15)
    assert "*3 dead letters*" in slack.texts()[0]


async def test_an_unreachable_webhook_never_blocks_recording(
    start_alerter: Callable[..., Alerter],
) -> None:
    alerter = start_alerter(slack_webhook_url="http://127.0.0.1:9/hooks/nothing-listens")

    def counted() -> int:
        return sum(a.count for a in alerter.outbox.values()) + sum(
            a.count for a in alerter.pending.values()
        )

    with capture_logs() as logs:
        for _ in range(1000):
            alerter.record([stored("billing.charge")])
        assert counted() == 1000, "recording returns at once and keeps every letter"
        await eventually(lambda: any(e["event"] == "alert.failed" for e in logs), timeout=15)
    assert counted() == 1000, "a failed post keeps its letters for the next try"


async def test_nothing_is_sent_without_a_webhook(
    start_alerter: Callable[..., Alerter], slack: SlackStandIn
) -> None:
    alerter = start_alerter(slack_webhook_url=None)
    alerter.record([stored("billing.charge")])
    assert alerter.pending == {}, "nothing is counted, so nothing can be sent"
    alerter.flush()
    assert alerter.outbox == {}
    assert slack.posts == []


async def test_a_real_failure_reaches_slack_through_the_collector(
    settings: Settings,
    slack: SlackStandIn,
    sqlite_url: str,
    make_app: AppFactory,
    run_worker: RunWorker,
) -> None:
    app = make_app("billing")

    @app.listener("order.placed", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object]) -> None:
        raise ValueError("card declined for <b>order</b>")

    await run_worker(app)
    lt = lt_settings(sqlite_url, slack_webhook_url=slack.url, alert_interval=0.2)
    async with LetterThief(lt, settings) as thief:
        await asyncio.wait_for(thief.collector.ready.wait(), 20)
        await app.dispatch_async("order.placed", {"order_id": "o-1"})
        await eventually(lambda: len(slack.posts) == 1, timeout=15)
    text = slack.texts()[0]
    assert f"`{app.service}.charge`" in text
    assert "`order.placed` x1" in text
    assert "card declined for &lt;b&gt;order&lt;/b&gt;" in text
