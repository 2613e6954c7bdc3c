"""The UI in Debian's chromium: log in, read a hostile letter safely, press Try again.

Also takes the screenshots ``docs/letterthief.md`` shows: into a temporary
folder, or into ``$LETTERTHIEF_SCREENSHOTS`` (``make screenshots`` refreshes
``docs/img`` that way, on purpose; no test run changes tracked files).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from playwright.async_api import Dialog, async_playwright, expect

from letterthief.service import LetterThief
from letterthief.web import create_app
from pigeon import Context, Retry, headers
from pigeon.settings import Settings
from tests.conftest import AppFactory, RunWorker, eventually
from tests.letterthief.conftest import letters_when, lt_settings, received

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOSTILE = {
    "order_id": "o-1042",
    "note": '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">',
    "items": [{"sku": "TEA-01", "qty": 2}],
}

pytestmark = pytest.mark.browser


@pytest.fixture
async def served(
    settings: Settings, sqlite_url: str, broker: object
) -> AsyncIterator[tuple[LetterThief, str]]:
    """LetterThief with its collector, served by uvicorn on a free loopback port."""
    thief = LetterThief(lt_settings(sqlite_url), settings)
    await thief.start()
    config = uvicorn.Config(
        create_app(thief), host="127.0.0.1", port=0, log_config=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started, timeout=10, message="uvicorn start")
        port = server.servers[0].sockets[0].getsockname()[1]
        await asyncio.wait_for(thief.collector.ready.wait(), 20)
        yield thief, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        await thief.stop()


async def test_an_operator_reads_a_hostile_letter_safely_and_tries_it_again(
    served: tuple[LetterThief, str], make_app: AppFactory, run_worker: RunWorker, tmp_path: Path
) -> None:
    IMG = Path(os.environ.get("LETTERTHIEF_SCREENSHOTS") or tmp_path)
    thief, base = served
    broken = {"yes": True}
    handled: list[Context] = []
    billing = make_app("billing")

    @billing.listener("order.placed", retry=Retry(attempts=3, immediate=2))
    async def charge_card(payload: dict[str, object], ctx: Context) -> None:
        if broken["yes"]:
            raise ValueError("no payment partner for region 'eu-north'")
        handled.append(ctx)

    await run_worker(billing)
    message_id = await billing.dispatch_async(
        "order.placed", HOSTILE, correlation_id="order-o-1042"
    )
    await letters_when(thief.store, 1)
    await thief.store.ingest(
        [
            received(f"seed-{i}", queue="notification.send-confirmation", event="order.placed",
                     exception_type="smtplib.SMTPServerDisconnected",
                     exception_message="Connection unexpectedly closed", correlation_id="order-o-1042" if i == 0 else None)
            for i in range(7)
        ]
        + [
            received(f"seed-l{i}", queue="logistics.book-courier", event="order.paid",
                     exception_type="httpx.ReadTimeout", exception_message="courier API timed out after 10s")
            for i in range(3)
        ]
        + [received("seed-u", queue="seller.reserve-stock", event="order.placed", reason="invalid-payload",
                    exception_type="pydantic_core.ValidationError",
                    exception_message="1 validation error for OrderPlaced\ntotal_cents\n  Field required")]
    )  # fmt: skip

    dialogs: list[str] = []
    dismissing: set[asyncio.Future[None]] = set()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 900})

            def on_dialog(dialog: Dialog) -> None:
                dialogs.append(dialog.message)
                dismissing.add(asyncio.ensure_future(dialog.dismiss()))

            page.on("dialog", on_dialog)
            await page.goto(f"{base}/")
            await expect(page).to_have_url(f"{base}/login?next=%2F")
            await page.fill("input[name=username]", "ops")
            await page.fill("input[name=password]", "s3cret")
            await page.click("button:has-text('Log in')")
            group = page.locator("table.groups tr", has_text=f"{billing.service}.charge-card")
            await expect(group).to_contain_text("ValueError")
            await expect(group.locator("td.num")).to_have_text("1")
            IMG.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(IMG / "letterthief-dashboard.png"))

            await page.goto(f"{base}/letters")
            await page.screenshot(path=str(IMG / "letterthief-list.png"))
            await page.goto(f"{base}/")
            await group.locator("code.exc").click()
            await page.locator("table.letters a.queue").first.click()
            await expect(page.locator("h1")).to_contain_text("order.placed")
            await expect(page.locator("[data-body]")).to_contain_text("<script>window.__xss=1")
            await expect(page.locator(".error-box")).to_contain_text("eu-north")
            await expect(page.locator("body")).to_contain_text("Same conversation")
            assert await page.evaluate("window.__xss") is None
            assert dialogs == []
            await page.screenshot(path=str(IMG / "letterthief-detail.png"), full_page=True)

            broken["yes"] = False
            await page.click("button:has-text('Try again')")
            await expect(page.locator("[data-status]")).to_have_text("retried")
            await expect(page.locator(".flash.ok")).to_contain_text("Sent back to its queue")
            await expect(page.locator("[data-history]")).to_contain_text("ops")
            assert await page.evaluate("window.__xss") is None
        finally:
            await browser.close()
    await eventually(lambda: len(handled) == 1, message="the listener handling the replay")
    assert handled[0].message_id == message_id
    assert handled[0].headers[headers.REPLAYED_BY] == "ops"
    assert dialogs == []
