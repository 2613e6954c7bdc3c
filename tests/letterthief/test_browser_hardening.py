"""The hardened UI in Debian's chromium: a forged letter, an edited replay, a logout (issue 13)."""

from __future__ import annotations

import pytest
from playwright.async_api import async_playwright, expect

from letterthief.service import LetterThief
from tests.conftest import Broker
from tests.letterthief.conftest import received
from tests.letterthief.test_browser import ARGS, CHROMIUM, served

__all__ = ["served"]  # the fixture, shared with test_browser

pytestmark = pytest.mark.browser


async def test_an_operator_sees_forged_origins_edits_and_logs_out_for_good(
    served: tuple[LetterThief, str], broker: Broker
) -> None:
    thief, base = served
    queue = f"{broker.prefix}.charge"
    broker.queues.add(queue)
    channel = await broker.connection.channel()
    await channel.declare_queue(queue, durable=True)
    await channel.close()
    forged = received("forged-1", queue=queue)
    forged.origin_problem = "origin headers disagree: x-pigeon-queue says 'mail.send'"
    honest = received("honest-1", queue=queue)
    stored_forged, stored_honest = await thief.store.ingest([forged, honest])
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{base}/login")
            await page.fill("input[name=username]", "ops")
            await page.fill("input[name=password]", "s3cret")
            await page.click("button:has-text('Log in')")
            await page.goto(f"{base}/letters/{stored_forged.letter_id}")
            await expect(page.locator("[data-origin-problem]")).to_contain_text("mail.send")
            await expect(page.locator("button:has-text('Try again')")).to_have_count(0)

            await page.goto(f"{base}/letters/{stored_honest.letter_id}/edit")
            await page.fill("textarea[name=body]", '{"order_id": "o-77", "region": "eu"}')
            await page.click("button:has-text('Send the edited message')")
            await expect(page.locator("[data-status]")).to_have_text("retried")
            history = page.locator("[data-edited-body]")
            await history.locator("summary").click()
            await expect(history).to_contain_text('"region": "eu"')

            cookies = await page.context.cookies()
            await page.click("button:has-text('Log out')")
            await expect(page).to_have_url(f"{base}/login")
            stolen = await browser.new_context()
            await stolen.add_cookies(cookies)  # type: ignore[arg-type]
            other = await stolen.new_page()
            await other.goto(f"{base}/")
            await expect(other).to_have_url(f"{base}/login?next=%2F")
        finally:
            await browser.close()
    assert await broker.wait_count(queue, 1) == 1
