"""The server-rendered UI through HTTP: login, CSRF, escaping, security headers, actions."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from letterthief.service import LetterThief
from letterthief.web import create_app
from tests.letterthief.conftest import received

XSS_BODY = b'{"note": "<script>window.__xss=1</script><img src=x onerror=\\"window.__xss=2\\">"}'


@pytest.fixture
async def browser_like(thief: LetterThief) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_app(thief))
    async with httpx.AsyncClient(transport=transport, base_url="http://lt.test") as c:
        yield c


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "page has no CSRF token"
    return match.group(1)


async def log_in(c: httpx.AsyncClient) -> None:
    page = await c.get("/login")
    response = await c.post(
        "/login",
        data={"username": "ops", "password": "s3cret", "csrf": csrf_of(page.text), "next": "/"},
    )
    assert response.status_code == 303


async def test_pages_need_a_login_and_a_wrong_password_is_refused(
    browser_like: httpx.AsyncClient,
) -> None:
    response = await browser_like.get("/letters?queue=x")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fletters%3Fqueue%3Dx"
    page = await browser_like.get("/login")
    wrong = await browser_like.post(
        "/login", data={"username": "ops", "password": "nope", "csrf": csrf_of(page.text)}
    )
    assert wrong.status_code == 401
    assert "LETTERTHIEF_USERNAME" in wrong.text
    await log_in(browser_like)
    assert (await browser_like.get("/")).status_code == 200


async def test_a_form_without_its_csrf_token_is_refused(
    thief: LetterThief, browser_like: httpx.AsyncClient
) -> None:
    (stored,) = await thief.store.ingest([received("csrf-1")])
    await log_in(browser_like)
    response = await browser_like.post(f"/letters/{stored.letter_id}/archive", data={})
    assert response.status_code == 403
    assert "reload the page" in response.text
    response = await browser_like.post(
        f"/letters/{stored.letter_id}/archive", data={"csrf": "forged"}
    )
    assert response.status_code == 403
    letter = await thief.store.get(stored.letter_id)
    assert letter is not None
    assert letter.status == "open"


async def test_message_content_is_escaped_and_the_page_has_a_strict_csp(
    thief: LetterThief, browser_like: httpx.AsyncClient
) -> None:
    (stored,) = await thief.store.ingest(
        [received("xss-1", body=XSS_BODY, exception_message="<img src=x onerror=alert(1)>")]
    )
    await log_in(browser_like)
    page = await browser_like.get(f"/letters/{stored.letter_id}")
    assert page.status_code == 200
    assert "<script>window.__xss" not in page.text
    assert "<img src=x" not in page.text
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    listing = await browser_like.get("/letters")
    assert "&lt;img src=x onerror=alert(1)&gt;" in listing.text
    assert "<img src=x" not in listing.text


async def test_the_session_cookie_is_signed_and_http_only(
    browser_like: httpx.AsyncClient,
) -> None:
    page = await browser_like.get("/login")
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    browser_like.cookies.set("letterthief_session", "forged.value.here")
    assert (await browser_like.get("/")).status_code == 303


async def test_filters_and_free_text_search_narrow_the_list(
    thief: LetterThief, browser_like: httpx.AsyncClient
) -> None:
    await thief.store.ingest(
        [
            received("find-me-123", queue="billing.charge"),
            received("other-1", queue="mail.send", body=b'{"sku": "ZZ-TOP"}'),
        ]
    )
    await log_in(browser_like)
    by_queue = await browser_like.get("/letters", params={"queue": "billing.charge"})
    assert "<strong>1</strong> letter" in by_queue.text
    by_text = await browser_like.get("/letters", params={"q": "zz-top"})
    assert "<strong>1</strong> letter" in by_text.text
    assert "mail.send" in by_text.text
    everything = await browser_like.get("/letters", params={"status": "any"})
    assert "<strong>2</strong> letters" in everything.text


async def test_a_group_can_be_archived_in_one_click(
    thief: LetterThief, browser_like: httpx.AsyncClient
) -> None:
    await thief.store.ingest([received(f"grp-{i}", queue="billing.charge") for i in range(4)])
    await log_in(browser_like)
    dashboard = await browser_like.get("/")
    assert "billing.charge" in dashboard.text
    response = await browser_like.post(
        "/bulk",
        data={
            "csrf": csrf_of(dashboard.text),
            "action": "archive",
            "group_queue": "billing.charge",
            "group_exception_type": "ValueError",
            "group_reason": "handler-error",
            "back": "/",
        },
    )
    assert response.status_code == 303
    assert "Archived+4+of+4" in response.headers["location"]
    assert (await thief.store.status_totals())["archived"] == 4


async def test_unsafe_redirects_after_login_stay_on_this_site(
    browser_like: httpx.AsyncClient,
) -> None:
    page = await browser_like.get("/login?next=//evil.example/")
    assert 'name="next" value="/"' in page.text


async def test_retrying_a_group_shows_progress_and_the_failures(
    thief: LetterThief, browser_like: httpx.AsyncClient
) -> None:
    await thief.store.ingest([received(f"gone-{i}", queue="nobody.home") for i in range(3)])
    await log_in(browser_like)
    dashboard = await browser_like.get("/")
    response = await browser_like.post(
        "/bulk",
        data={
            "csrf": csrf_of(dashboard.text),
            "action": "retry",
            "group_queue": "nobody.home",
            "group_exception_type": "ValueError",
            "group_reason": "handler-error",
            "back": "/",
        },
    )
    assert response.status_code == 303
    job_url = response.headers["location"]
    assert job_url.startswith("/jobs/")
    for _ in range(100):
        page = await browser_like.get(job_url)
        if "Done:" in page.text:
            break
        assert 'http-equiv="refresh"' in page.text
        await asyncio.sleep(0.05)
    assert "3 failed" in page.text
    assert "queue nobody.home does not exist" in page.text
    assert (await thief.store.status_totals())["open"] == 3
