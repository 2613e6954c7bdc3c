"""The JSON API: auth, filters, pages, and every action against the real broker."""

from __future__ import annotations

import base64
import json

import httpx

from letterthief.models import Status
from letterthief.service import LetterThief
from letterthief.web import create_app
from pigeon import Context, Retry, headers
from tests.conftest import AppFactory, Broker, RunWorker, eventually
from tests.letterthief.conftest import letters_when, received


async def test_anonymous_callers_are_told_how_to_authenticate(thief: LetterThief) -> None:
    transport = httpx.ASGITransport(app=create_app(thief))
    async with httpx.AsyncClient(transport=transport, base_url="http://lt.test") as anon:
        response = await anon.get("/api/dead-letters")
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Basic")
        assert "LETTERTHIEF_API_TOKEN" in response.json()["detail"]
        assert (await anon.post("/api/dead-letters/1/archive")).status_code == 401
        assert (await anon.get("/metrics")).status_code == 401
        assert (await anon.get("/healthz")).status_code == 200


async def test_basic_auth_and_bearer_tokens_are_accepted(thief: LetterThief) -> None:
    transport = httpx.ASGITransport(app=create_app(thief))
    good = "Basic " + base64.b64encode(b"ops:s3cret").decode()
    bad = "Basic " + base64.b64encode(b"ops:guess").decode()
    async with httpx.AsyncClient(transport=transport, base_url="http://lt.test") as c:
        assert (
            await c.get("/api/dead-letters", headers={"Authorization": good})
        ).status_code == 200
        assert (await c.get("/api/dead-letters", headers={"Authorization": bad})).status_code == 401
        bearer = {"Authorization": "Bearer tok-123"}
        assert (await c.get("/api/dead-letters", headers=bearer)).status_code == 200
        wrong = {"Authorization": "Bearer tok-999"}
        assert (await c.get("/api/dead-letters", headers=wrong)).status_code == 401


async def test_the_list_filters_and_pages_with_a_total(
    thief: LetterThief, client: httpx.AsyncClient
) -> None:
    await thief.store.ingest(
        [received(f"a-{i}", queue="billing.charge") for i in range(5)]
        + [received("b-1", queue="mail.send", event="user.joined", body=b'{"email": "x@y.z"}')]
    )
    everything = (await client.get("/api/dead-letters")).json()
    assert everything["total"] == 6
    item = everything["items"][0]
    for key in (
        "id",
        "message_id",
        "event",
        "queue",
        "service",
        "reason",
        "exception_type",
        "exception_message",
        "status",
        "occurrences",
        "first_seen_at",
        "last_seen_at",
    ):
        assert key in item
    mail = (await client.get("/api/dead-letters", params={"queue": "mail.send"})).json()
    assert [i["message_id"] for i in mail["items"]] == ["b-1"]
    assert (await client.get("/api/dead-letters", params={"q": "x@y.z"})).json()["total"] == 1
    assert (await client.get("/api/dead-letters", params={"event": "user.joined"})).json()[
        "total"
    ] == 1
    first = (await client.get("/api/dead-letters", params={"limit": 4})).json()
    assert len(first["items"]) == 4
    second = (
        await client.get("/api/dead-letters", params={"limit": 4, "cursor": first["next_cursor"]})
    ).json()
    assert len(second["items"]) == 2
    assert second["next_cursor"] is None
    assert (await client.get("/api/dead-letters", params={"status": "nope"})).status_code == 422
    assert (await client.get("/api/dead-letters", params={"cursor": "zz"})).status_code == 422


async def test_the_detail_has_headers_properties_body_and_traceback(
    thief: LetterThief, client: httpx.AsyncClient
) -> None:
    (stored,) = await thief.store.ingest([received("d-1", body=b'{"order_id": "o-1"}')])
    detail = (await client.get(f"/api/dead-letters/{stored.letter_id}")).json()
    assert detail["headers"]["x-pigeon-exception-type"] == "ValueError"
    assert detail["properties"]["message_id"] == "d-1"
    assert json.loads(detail["body"]) == {"order_id": "o-1"}
    assert detail["traceback"].startswith("Traceback")
    assert (await client.get("/api/dead-letters/999999")).status_code == 404


async def test_try_again_reaches_only_the_original_queue(
    thief: LetterThief, client: httpx.AsyncClient, make_app: AppFactory, run_worker: RunWorker
) -> None:
    broken = {"yes": True}
    billing_seen: list[Context] = []
    mail_seen: list[str] = []
    billing = make_app("billing")
    mail = make_app("mail")

    @billing.listener("order.placed", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object], ctx: Context) -> None:
        if broken["yes"]:
            raise ValueError("card service down")
        billing_seen.append(ctx)

    @mail.listener("order.placed")
    async def confirm(payload: dict[str, object], ctx: Context) -> None:
        mail_seen.append(ctx.message_id)

    await run_worker(billing)
    mail_worker = await run_worker(mail)
    message_id = await billing.dispatch_async("order.placed", {"order_id": "o-1"})
    (letter,) = await letters_when(thief.store, 1)
    await eventually(lambda: mail_seen == [message_id])
    broken["yes"] = False
    response = await client.post(f"/api/dead-letters/{letter.id}/retry")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "retried"
    await eventually(lambda: len(billing_seen) == 1)
    ctx = billing_seen[0]
    assert ctx.message_id == message_id
    assert ctx.event_name == "order.placed"
    assert ctx.headers[headers.REPLAY_OF] == str(letter.id)
    assert ctx.headers[headers.REPLAYED_BY] == "api-token"
    assert headers.REASON not in ctx.headers
    assert headers.TRACEBACK not in ctx.headers
    await mail_worker.join(timeout=30)
    assert mail_seen == [message_id]  # the other subscriber did not get it again
    detail = (await client.get(f"/api/dead-letters/{letter.id}")).json()
    assert [(h["actor"], h["action"], h["result"]) for h in detail["history"]] == [
        ("api-token", "retry", "ok")
    ]
    assert (await client.post(f"/api/dead-letters/{letter.id}/retry")).status_code == 409


async def test_a_replay_that_fails_again_reopens_the_same_letter(
    thief: LetterThief, client: httpx.AsyncClient, make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("billing")

    @app.listener("order.placed", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object]) -> None:
        raise ValueError("still down")

    await run_worker(app)
    await app.dispatch_async("order.placed", {"order_id": "o-2"})
    (letter,) = await letters_when(thief.store, 1)
    assert (await client.post(f"/api/dead-letters/{letter.id}/retry")).status_code == 200
    (again,) = await letters_when(thief.store, 1, occurrences=2)
    assert again.id == letter.id
    assert again.status == "open"
    detail = (await client.get(f"/api/dead-letters/{letter.id}")).json()
    assert detail["occurrence_log"][0]["replay_of"] == str(letter.id)


async def test_an_edited_retry_sends_the_new_body_and_is_audited(
    thief: LetterThief, client: httpx.AsyncClient, make_app: AppFactory, run_worker: RunWorker
) -> None:
    app = make_app("billing")
    got: list[dict[str, object]] = []

    @app.listener("order.placed", retry=Retry(attempts=1))
    async def charge(payload: dict[str, object]) -> None:
        if "region" not in payload:
            raise KeyError("region")
        got.append(payload)

    await run_worker(app)
    await app.dispatch_async("order.placed", {"order_id": "o-3"})
    (letter,) = await letters_when(thief.store, 1)
    url = f"/api/dead-letters/{letter.id}/retry"
    invalid = await client.post(url, json={"body": "{not json"})
    assert invalid.status_code == 422
    assert "not valid JSON" in invalid.json()["detail"]
    fixed = await client.post(url, json={"body": '{"order_id": "o-3", "region": "eu"}'})
    assert fixed.status_code == 200, fixed.text
    await eventually(lambda: got == [{"order_id": "o-3", "region": "eu"}])
    detail = (await client.get(f"/api/dead-letters/{letter.id}")).json()
    assert detail["history"][0]["action"] == "edit-retry"
    assert json.loads(detail["body"]) == {"order_id": "o-3"}  # the original is kept


async def test_bulk_retry_reports_what_was_sent_failed_and_skipped(
    thief: LetterThief, client: httpx.AsyncClient, broker: Broker
) -> None:
    queue = f"{broker.prefix}.bulk-target"
    broker.queues.add(queue)
    channel = await broker.connection.channel()
    await channel.declare_queue(queue, durable=True)
    await channel.close()
    stored = await thief.store.ingest(
        [received(f"bulk-{i}", queue=queue) for i in range(250)]
        + [received("gone-1", queue=f"{broker.prefix}.gone")]
    )
    ids = [s.letter_id for s in stored]
    await thief.store.set_status(ids[:10], Status.ARCHIVED, "ops")
    result = (await client.post("/api/dead-letters/retry", json={"ids": [*ids, 424242]})).json()
    assert result["done"] == 240
    assert result["failed"] == 1
    assert result["skipped"] == 11
    assert "does not exist" in result["errors"][str(ids[-1])]
    assert await broker.count(queue) == 240


async def test_a_missing_queue_is_a_visible_error_and_the_letter_stays_open(
    thief: LetterThief, client: httpx.AsyncClient, broker: Broker
) -> None:
    (stored,) = await thief.store.ingest([received("m-1", queue=f"{broker.prefix}.deleted")])
    response = await client.post(f"/api/dead-letters/{stored.letter_id}/retry")
    assert response.status_code == 409
    assert "does not exist" in response.json()["detail"]
    detail = (await client.get(f"/api/dead-letters/{stored.letter_id}")).json()
    assert detail["status"] == "open"
    assert detail["history"][0]["result"] == "failed"


async def test_archive_and_restore_are_idempotent_and_audited(
    thief: LetterThief, client: httpx.AsyncClient
) -> None:
    (stored,) = await thief.store.ingest([received("ar-1")])
    url = f"/api/dead-letters/{stored.letter_id}"
    assert (await client.post(f"{url}/archive")).json()["status"] == "archived"
    assert (await client.post(f"{url}/retry")).status_code == 409
    assert (await client.post(f"{url}/restore")).json()["status"] == "open"
    again = await client.post(f"{url}/restore")  # idempotent: already open
    assert (again.status_code, again.json()["status"]) == (200, "open")
    history = (await client.get(url)).json()["history"]
    assert [h["action"] for h in history] == ["restore", "archive"]


async def test_metrics_count_letters_by_status_and_queue(
    thief: LetterThief, client: httpx.AsyncClient
) -> None:
    await thief.store.ingest([received("x-1", queue="billing.charge"), received("x-2")])
    text = (await client.get("/metrics")).text
    assert 'letterthief_letters{queue="billing.charge",status="open"} 1.0' in text
    assert "letterthief_collector_lag_seconds" in text
    health = (await client.get("/healthz")).json()
    assert health["status"] == "ok"
    assert health["collector"] == "consuming"
