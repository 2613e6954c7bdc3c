"""LetterThief under hostile letters, double clicks and stolen cookies (issue 13).

Each test reproduces one defect of the hardening review against the real
broker (and SQLite and PostgreSQL where storage matters).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from letterthief import api as letterthief_api
from letterthief.alerts import Alerter
from letterthief.models import Status
from letterthief.parse import describe, from_json
from letterthief.service import LetterThief
from letterthief.store import Stored
from letterthief.web import create_app
from pigeon import Retry
from pigeon.logs import configure_logging
from pigeon.settings import Settings
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.letterthief import hostile
from tests.letterthief.conftest import letters_when, lt_settings, received
from tests.letterthief.test_web import csrf_of, log_in

ThiefFactory = Callable[..., Awaitable[LetterThief]]


@pytest.fixture
async def make_thief(
    settings: Settings, sqlite_url: str, broker: Broker
) -> AsyncIterator[ThiefFactory]:
    """Start a LetterThief (collector running) with settings overrides; stopped after."""
    started: list[LetterThief] = []
    broker.track(settings)

    async def make(database_url: str = sqlite_url, **overrides: Any) -> LetterThief:
        overrides.setdefault("replay_timeout", 3.0)
        thief = LetterThief(lt_settings(database_url, **overrides), settings)
        started.append(thief)
        await thief.start()
        await asyncio.wait_for(thief.collector.ready.wait(), 20)
        return thief

    try:
        yield make
    finally:
        for thief in started:
            await thief.stop()


def api(thief: LetterThief) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(thief)),
        base_url="http://letterthief.test",
        headers={"Authorization": "Bearer tok-123"},
    )


async def declare(broker: Broker, name: str) -> str:
    broker.queues.add(name)
    channel = await broker.connection.channel()
    await channel.declare_queue(name, durable=True)
    await channel.close()
    return name


async def dead_letter(settings: Settings, queue: str, message_id: str, **headers: Any) -> None:
    """A pigeon-shaped dead letter of ``queue``, published with pika."""
    await hostile.publish(
        settings.dead_letter_exchange,
        queue,
        headers={
            "x-pigeon-reason": "handler-error",
            "x-pigeon-exception-type": "ValueError",
            "x-pigeon-queue": queue,
            **headers,
        },
        message_id=message_id,
        type="order.placed",
    )


async def test_an_unencodable_letter_does_not_break_the_replays_after_it(
    make_thief: ThiefFactory, settings: Settings, broker: Broker
) -> None:
    """Defect 1: bytes, non-UTF-8 text and -1 in headers; then ordinary letters still replay."""
    thief = await make_thief()
    queue = await declare(broker, f"{broker.prefix}.charge")
    await dead_letter(
        settings,
        queue,
        "bad-bytes",
        **{"x-blob": b"\x01\x02", "x-latin": hostile.RawText(b"caf\xe9")},
    )
    await dead_letter(settings, queue, "bad-int", **{"x-small": -1})
    await dead_letter(settings, queue, "good-1")
    await dead_letter(settings, queue, "good-2")
    letters = {x.message_id: x.id for x in await letters_when(thief.store, 4)}
    async with api(thief) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        blob = await client.post(f"/api/dead-letters/{letters['bad-bytes']}/retry")
        assert blob.status_code == 200, blob.text
        small = await client.post(f"/api/dead-letters/{letters['bad-int']}/retry")
        # pigeon's encoder may or may not take -1; either way it is named, never a 503
        assert small.status_code in (200, 422), small.text
        if small.status_code == 422:
            assert "x-small" in small.json()["detail"]
        for name in ("good-1", "good-2"):
            good = await client.post(f"/api/dead-letters/{letters[name]}/retry")
            assert good.status_code == 200, good.text
            assert good.json()["status"] == "retried"
        assert loop.time() - started < 3.0
        expected = 3 + (small.status_code == 200)
        assert await broker.wait_count(queue, expected) == expected
        replayed = await broker.get(queue)
        assert replayed.message_id == "bad-bytes"
        assert replayed.headers is not None
        assert bytes(replayed.headers["x-blob"]) == b"\x01\x02"  # type: ignore[arg-type]
        for name in ("good-1", "good-2"):
            history = (await client.get(f"/api/dead-letters/{letters[name]}")).json()["history"]
            assert [h["result"] for h in history] == ["ok"]
    await asyncio.sleep(0.2)
    assert await broker.count(queue) == expected - 1  # each delivered once


async def test_a_crafted_letter_cannot_choose_where_its_replay_goes(
    make_thief: ThiefFactory, settings: Settings, broker: Broker
) -> None:
    """Defect 2: one origin rule; never into amq.*, LetterThief's queues or retry tiers."""
    thief = await make_thief()
    own = await declare(broker, f"{broker.prefix}.own")
    victim = await declare(broker, f"{broker.prefix}.victim")
    tier = await declare(broker, f"{own}.retry.5s")
    channel = await broker.connection.channel()
    exclusive = (await channel.declare_queue(exclusive=True)).name
    assert exclusive.startswith("amq.gen-")
    await dead_letter(settings, own, "says-victim", **{"x-pigeon-queue": victim})
    death = {"queue": victim, "reason": "rejected", "count": 1, "exchange": ""}
    await hostile.publish(
        settings.dead_letter_exchange, own, headers={"x-death": [death]}, message_id="dies-victim"
    )
    for name, key in (
        ("to-exclusive", exclusive),
        ("to-dead-letters", settings.dead_letter_queue),
        ("to-unrouted", settings.unrouted_queue),
        ("to-tier", tier),
    ):
        await dead_letter(settings, key, name, **{"x-pigeon-queue": key})
    await hostile.publish(settings.unrouted_exchange, "order.placed", message_id="loop-unrouted")
    letters = {x.message_id: x for x in await letters_when(thief.store, 7)}
    async with api(thief) as client:
        for name in ("says-victim", "dies-victim"):
            detail = (await client.get(f"/api/dead-letters/{letters[name].id}")).json()
            assert "origin headers disagree" in detail["origin_problem"]
        for name, letter in letters.items():
            response = await client.post(f"/api/dead-letters/{letter.id}/retry")
            assert response.status_code == 409, (name, response.text)
    await asyncio.sleep(0.3)
    for queue in (own, victim, tier, exclusive):
        assert await broker.count(queue) == 0
    await channel.close()


async def test_a_second_failure_of_the_same_message_keeps_each_body(store: Any) -> None:
    """Defect 2: the letter keeps the first body; a later occurrence keeps its own."""
    first = received("same-id", body=b'{"amount": 1}')
    await store.ingest([first])
    (again,) = await store.ingest([received("same-id", body=b'{"amount": 1000000}')])
    await store.ingest([received("same-id", body=b'{"amount": 1}')])
    detail = await store.detail(again.letter_id)
    assert detail is not None
    assert detail.letter.body == b'{"amount": 1}'
    assert [o.body for o in detail.occurrences] == [None, b'{"amount": 1000000}', None]
    batch = await store.ingest(
        [received("one-batch", body=b"[1]"), received("one-batch", body=b"[2]")]
    )
    detail = await store.detail(batch[0].letter_id)
    assert detail is not None
    assert detail.letter.body == b"[1]"
    assert sorted(o.body or b"" for o in detail.occurrences) == [b"", b"[2]"]


async def test_dead_letters_of_a_worker_carry_the_connection_user(
    thief: LetterThief, client: httpx.AsyncClient, make_app: AppFactory, run_worker: RunWorker
) -> None:
    """Defect 2: RabbitMQ checks user_id against the connection, so it names the publisher."""
    app = make_app("billing")

    @app.listener("order.placed", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object]) -> None:
        raise ValueError("no")

    await run_worker(app)
    await app.dispatch_async("order.placed", {"order_id": "o-1"})
    (letter,) = await letters_when(thief.store, 1)
    detail = (await client.get(f"/api/dead-letters/{letter.id}")).json()
    assert detail["user_id"] == "guest"
    assert detail["origin_problem"] == ""


async def test_the_letter_page_flags_a_disagreeing_origin_and_offers_no_try_again(
    thief: LetterThief,
) -> None:
    """Defect 2, in the UI: the flag is shown and Try again is not offered."""
    forged = received("forged-1", queue="billing.charge")
    forged.origin_problem = "origin headers disagree: x-pigeon-queue says 'mail.send'"
    (stored,) = await thief.store.ingest([forged])
    async with api(thief) as client:
        await log_in(client)
        page = (await client.get(f"/letters/{stored.letter_id}")).text
        listing = (await client.get("/letters")).text
    assert "Not replayable" in page
    assert "x-pigeon-queue says &#39;mail.send&#39;" in page
    assert f'action="/letters/{stored.letter_id}/retry"' not in page
    assert "origin headers disagree" in listing


async def test_parallel_retries_of_the_same_letters_deliver_one_copy_each(
    make_thief: ThiefFactory, database_url: str, broker: Broker
) -> None:
    """Defect 3: ten clicks, one copy; two bulk retries of 20 letters, 20 copies."""
    thief = await make_thief(database_url)
    queue = await declare(broker, f"{broker.prefix}.charge")
    (one,) = await thief.store.ingest([received("click-1", queue=queue)])
    async with api(thief) as client:
        url = f"/api/dead-letters/{one.letter_id}/retry"
        answers = await asyncio.gather(*(client.post(url) for _ in range(10)))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] + [409] * 9, [a.text for a in answers]
        assert await broker.wait_count(queue, 1) == 1
        stored = await thief.store.ingest([received(f"bulk-{i}", queue=queue) for i in range(20)])
        body = {"ids": [s.letter_id for s in stored]}
        jobs = await asyncio.gather(
            *(client.post("/api/dead-letters/retry", json=body) for _ in range(2))
        )
        assert sum(j.json()["done"] for j in jobs) == 20
        assert sum(j.json()["skipped"] for j in jobs) == 20
    await asyncio.sleep(0.3)
    assert await broker.count(queue) == 21


HOOK = "https://hooks.slack.example/services/T0SECRET/B0SECRET/xoxSECRETPATH"


@asynccontextmanager
async def alerter_answering(
    tmp_path: Path, answer: Callable[[str], int], **overrides: Any
) -> AsyncIterator[tuple[Alerter, list[str]]]:
    """An Alerter whose webhook answers ``answer(text)``; yields it and the texts posted."""
    posted: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        text = json.loads(request.content)["text"]
        status = answer(text)
        if status == 200:
            posted.append(text)
        return httpx.Response(status, text="invalid_blocks: SECRET-RESPONSE-BODY " * 20)

    values: dict[str, Any] = {"slack_webhook_url": HOOK, "alert_interval": 0.1}
    values.update(overrides)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    alerter = Alerter(lt_settings(f"sqlite:///{tmp_path / 'x.db'}", **values), client=client)
    task = asyncio.create_task(alerter.run())
    try:
        yield alerter, posted
    finally:
        alerter.stop()
        await asyncio.wait_for(task, 10)
        await client.aclose()


def failure(queue: str) -> Stored:
    return Stored(1, queue, "order.placed", "svc", "handler-error", "ValueError", "boom", None)


async def test_a_failing_webhook_is_logged_by_host_never_by_its_secret_path(
    tmp_path: Path,
) -> None:
    """Defect 4: alert.failed names the webhook's host; no path, no response body."""
    with structlog.testing.capture_logs() as logs:
        async with alerter_answering(tmp_path, lambda text: 500) as (alerter, _):
            alerter.record([failure("billing.charge")])
            await eventually(lambda: any(e["event"] == "alert.failed" for e in logs))
    failed = [e for e in logs if e["event"] == "alert.failed"]
    assert failed[0]["webhook"] == "hooks.slack.example"
    everything = repr(logs)
    assert "SECRET" not in everything
    assert "HTTP 500" in everything


async def test_a_refused_alert_is_parked_and_never_holds_up_other_queues(
    tmp_path: Path,
) -> None:
    """Defect 5: a 400 for one queue parks that alert; the others are still sent."""

    def answer(text: str) -> int:
        return 400 if "poisoned.queue" in text else 200

    with structlog.testing.capture_logs() as logs:
        async with alerter_answering(tmp_path, answer) as (alerter, posted):
            alerter.record([failure("poisoned.queue")])
            await eventually(lambda: any(e["event"] == "alert.parked" for e in logs))
            alerter.record([failure("billing.charge"), failure("mail.send")])
            await eventually(lambda: len(posted) == 2, timeout=10)
            assert alerter.outbox == {}
            assert alerter.metrics.alerts.labels("parked")._value.get() == 1


async def test_many_queues_failing_at_once_make_one_summary_post(tmp_path: Path) -> None:
    """Defect 5: more than LETTERTHIEF_ALERT_MAX_QUEUES queues at once: one post, not 40."""
    async with alerter_answering(tmp_path, lambda text: 200, alert_max_queues=5) as (
        alerter,
        posted,
    ):
        alerter.record([failure(f"service-{i}.listener") for i in range(40)])
        await eventually(lambda: len(posted) == 1, timeout=10)
        assert "40 queues" in posted[0]
        assert "service-0.listener" in posted[0]
        await asyncio.sleep(0.3)  # a flush or two later: still the one post
        assert len(posted) == 1


def ui(thief: LetterThief) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(thief)), base_url="http://letterthief.test"
    )


async def test_a_copied_session_cookie_dies_at_logout_and_with_new_credentials(
    make_thief: ThiefFactory, sqlite_url: str
) -> None:
    """Defect 6: sessions are revoked server-side and bound to the credentials."""
    thief = await make_thief()
    async with ui(thief) as browser:
        before = csrf_of((await browser.get("/login")).text)
        await log_in(browser)
        dashboard = await browser.get("/")
        assert dashboard.status_code == 200
        assert csrf_of(dashboard.text) != before  # a fresh CSRF token at login
        stolen = dict(browser.cookies)
        logout = await browser.post("/logout", data={"csrf": csrf_of(dashboard.text)})
        assert logout.status_code == 303
    async with ui(thief) as thief_client:
        thief_client.cookies.update(stolen)
        assert (await thief_client.get("/")).status_code == 303
        assert (await thief_client.get("/api/dead-letters")).status_code == 401
    async with ui(thief) as browser:
        await log_in(browser)
        stolen = dict(browser.cookies)
        assert (await browser.get("/")).status_code == 200
    await thief.stop()
    restarted = await make_thief(sqlite_url, password="n3w-passw0rd")
    async with ui(restarted) as thief_client:
        thief_client.cookies.update(stolen)
        assert (await thief_client.get("/")).status_code == 303


async def test_the_open_loopback_mode_serves_only_loopback_and_public_hosts(
    make_thief: ThiefFactory,
) -> None:
    """Defect 7: DNS rebinding: a foreign Host is refused; Origin is checked on writes."""
    thief = await make_thief(username=None, password=None, api_token=None)
    (stored,) = await thief.store.ingest([received("rebind-1")])
    transport = httpx.ASGITransport(app=create_app(thief))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8025") as c:
        assert (await c.get("/")).status_code == 200
        assert (await c.get("/", headers={"Host": "localhost:8025"})).status_code == 200
        assert (await c.get("/", headers={"Host": "letterthief.test"})).status_code == 200
        rebound = await c.get("/api/dead-letters", headers={"Host": "attacker.example:8025"})
        assert rebound.status_code == 403
        assert "LETTERTHIEF_PUBLIC_URL" in rebound.text
        url = f"/api/dead-letters/{stored.letter_id}/archive"
        c.cookies.clear()  # a script without the page's cookie (and its CSRF token)
        for origin in ("http://attacker.example", "null"):
            cross = await c.post(url, json={}, headers={"Origin": origin})
            assert cross.status_code == 403, origin
        same = await c.post(url, json={}, headers={"Origin": "http://127.0.0.1:8025"})
        assert same.status_code == 200
    async with ui(await make_thief()) as logged:
        page = await logged.get("/login")
        evil = await logged.post(
            "/login",
            data={"username": "ops", "password": "s3cret", "csrf": csrf_of(page.text)},
            headers={"Origin": "http://attacker.example"},
        )
        assert evil.status_code == 403


def test_a_logged_exception_shows_its_traceback_not_an_object(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Defect 8: stdlib records with exc_info (uvicorn's errors) render the traceback."""
    configure_logging("json", "INFO")
    try:
        try:
            raise ValueError("kaputt")
        except ValueError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    finally:
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert "<traceback object" not in err
    assert "Traceback (most recent call last)" in err
    assert "kaputt" in err


async def test_tag_shaped_header_tables_and_deep_bodies_are_shown_and_replayed(
    make_thief: ThiefFactory, database_url: str, settings: Settings, broker: Broker
) -> None:
    """Defect 8: headers that look like storage tags, and a 100,000-deep JSON body."""
    thief = await make_thief(database_url)
    queue = await declare(broker, f"{broker.prefix}.charge")
    tables = {
        "x-bytes": {"$bytes": "not base64!"},
        "x-when": {"$datetime": "garbage"},
        "x-dec": {"$decimal": "NaN-ish"},
        "x-escaped": {"$$bytes": "AA=="},
    }
    deep = b"[" * 100_000 + b"]" * 100_000
    await hostile.publish(
        settings.dead_letter_exchange,
        queue,
        deep,
        headers={"x-pigeon-queue": queue, "x-pigeon-reason": "handler-error", **tables},
        message_id="tags-1",
    )
    (letter,) = await letters_when(thief.store, 1)
    async with api(thief) as client:
        detail = await client.get(f"/api/dead-letters/{letter.id}")
        assert detail.status_code == 200, detail.text
        for key, value in tables.items():
            assert detail.json()["headers"][key] == value
        await log_in(client)
        assert (await client.get(f"/letters/{letter.id}")).status_code == 200
        assert (await client.get(f"/letters/{letter.id}/edit")).status_code == 200
        edited = await client.post(
            f"/api/dead-letters/{letter.id}/retry", json={"body": deep.decode()}
        )
        assert edited.status_code == 422, edited.text
        assert (await client.post(f"/api/dead-letters/{letter.id}/retry")).status_code == 200
    replayed = await broker.get(queue)
    assert replayed.headers is not None
    for key, value in tables.items():
        assert replayed.headers[key] == value


async def test_a_plain_letter_failing_again_after_archive_is_a_new_occurrence(
    store: Any,
) -> None:
    """Defect 8: without failed-at or x-death, a redelivered copy is still counted."""

    def plain(redelivered: bool) -> Any:
        return describe(
            body=b"{}",
            headers={},
            properties={"message_id": "plain-1"},
            exchange="pigeon.dead",
            routing_key="legacy.q",
            redelivered=redelivered,
        )

    (first,) = await store.ingest([plain(False)])
    await store.set_status([first.letter_id], Status.ARCHIVED, "ops")
    assert len(await store.ingest([plain(True)])) == 1
    letter = await store.get(first.letter_id)
    assert (letter.status, letter.occurrences) == ("open", 2)


async def test_odd_credentials_huge_ids_and_bad_targets_get_the_right_status(
    make_thief: ThiefFactory,
) -> None:
    """Defect 8: 401 for a non-ASCII token, 404 for ids >= 2**64, 409/422 for targets."""
    thief = await make_thief()
    nowhere, too_long = await thief.store.ingest(
        [received("no-target", queue=""), received("long-target", queue="q" * 300)]
    )
    async with api(thief) as client:
        odd = await client.get(
            "/api/dead-letters", headers={b"Authorization": "Bearer té".encode()}
        )
        assert odd.status_code == 401
        for big in (2**63, 2**64, 10**30):
            assert (await client.get(f"/api/dead-letters/{big}")).status_code == 404
            assert (await client.post(f"/api/dead-letters/{big}/retry")).status_code == 404
            assert (await client.post(f"/api/dead-letters/{big}/archive")).status_code == 404
        many = await client.post("/api/dead-letters/retry", json={"ids": [2**64]})
        assert many.status_code == 200
        assert many.json()["skipped"] == 1
        missing = await client.post(f"/api/dead-letters/{nowhere.letter_id}/retry")
        assert missing.status_code == 409, missing.text
        long = await client.post(f"/api/dead-letters/{too_long.letter_id}/retry")
        assert long.status_code == 422, long.text
        await log_in(client)
        assert (await client.get(f"/letters/{2**64}")).status_code == 404


async def test_guessing_passwords_is_rate_limited(make_thief: ThiefFactory) -> None:
    """Defect 8: per IP and per user, wrong logins and wrong API Basic end in 429."""
    thief = await make_thief(login_attempts=5)
    async with ui(thief) as guesser:
        codes = []
        for _ in range(8):
            page = await guesser.get("/login")
            wrong = await guesser.post(
                "/login",
                data={"username": "ops", "password": "guess", "csrf": csrf_of(page.text)},
            )
            codes.append(wrong.status_code)
        assert codes[:5] == [401] * 5
        assert codes[-1] == 429
        basic = {"Authorization": "Basic b3BzOmd1ZXNz"}  # ops:guess
        assert (await guesser.get("/api/dead-letters", headers=basic)).status_code == 429


async def test_edited_bodies_are_capped_and_shown_in_the_history(
    make_thief: ThiefFactory, broker: Broker
) -> None:
    """Defect 8: LETTERTHIEF_MAX_EDIT_BYTES caps an edit; the history shows what was sent."""
    thief = await make_thief(max_edit_bytes=64)
    queue = await declare(broker, f"{broker.prefix}.charge")
    (stored,) = await thief.store.ingest([received("edit-1", queue=queue)])
    url = f"/api/dead-letters/{stored.letter_id}/retry"
    async with api(thief) as client:
        huge = await client.post(url, json={"body": json.dumps({"pad": "x" * 100})})
        assert huge.status_code == 422
        assert "LETTERTHIEF_MAX_EDIT_BYTES" in huge.json()["detail"]
        fixed = await client.post(url, json={"body": '{"order_id": "o-9"}'})
        assert fixed.status_code == 200, fixed.text
        history = (await client.get(f"/api/dead-letters/{stored.letter_id}")).json()["history"]
        assert history[0]["body"] == '{"order_id": "o-9"}'
        await log_in(client)
        page = (await client.get(f"/letters/{stored.letter_id}")).text
        assert "o-9" in page


async def test_healthz_shows_status_only_and_the_schema_needs_auth(
    make_thief: ThiefFactory,
) -> None:
    """Defect 8: no database path or broker user in /healthz; /api/openapi.json is private."""
    thief = await make_thief()
    async with ui(thief) as anonymous:
        health = await anonymous.get("/healthz")
        assert health.status_code == 200
        assert set(health.json()) <= {"status", "collector", "database"}
        assert "guest" not in health.text
        assert ".db" not in health.text
        assert (await anonymous.get("/api/openapi.json")).status_code == 401
    async with api(thief) as client:
        schema = await client.get("/api/openapi.json")
        assert schema.status_code == 200
        assert "/api/dead-letters" in schema.json()["paths"]


async def test_non_finite_float_headers_are_stored_and_come_back(store: Any) -> None:
    """A hostile NaN or infinity must not make PostgreSQL refuse (and the collector loop on) a batch."""
    r = describe(
        body=b"{}",
        headers={"x-nan": float("nan"), "x-inf": [float("inf"), float("-inf")]},
        properties={"message_id": "nan-1"},
        exchange="pigeon.dead",
        routing_key="legacy.q",
    )
    (stored,) = await store.ingest([r])
    letter = await store.get(stored.letter_id)
    back = from_json(letter.headers)
    assert math.isnan(back["x-nan"])
    assert back["x-inf"] == [float("inf"), float("-inf")]
    shown = json.dumps(letterthief_api.plain(letter.headers), allow_nan=False)
    assert json.loads(shown)["x-inf"] == ["inf", "-inf"]
