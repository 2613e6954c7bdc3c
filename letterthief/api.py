"""The JSON API (``/api/...``), ``/healthz`` and ``/metrics``.

Errors are ``{"detail": "..."}`` with a status that says whose move it is:
404 no such letter, 409 the letter is not open or its queue is gone, 422 an
edited body that does not parse, 503 the broker did not confirm.
"""

from __future__ import annotations

import base64
import math
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from sqlalchemy import text

from letterthief import parse
from letterthief.models import Letter, Status
from letterthief.queries import BadCursor, Detail, Filters
from letterthief.replay import (
    BrokerUnavailable,
    InvalidBody,
    LetterNotFound,
    NotReplayable,
    NotRetryable,
    QueueMissing,
    ReplayError,
)
from letterthief.service import LetterThief

if TYPE_CHECKING:
    from letterthief.auth import Auth
    from letterthief.queries import Group

MAX_IDS = 100_000


class RetryRequest(BaseModel):
    body: str | None = Field(default=None, description="replaces the body; JSON is validated")


class IdsRequest(BaseModel):
    ids: list[int] = Field(max_length=MAX_IDS)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def item(letter: Letter) -> dict[str, Any]:
    """A letter as the list returns it."""
    return {
        "id": letter.id,
        "message_id": letter.message_id,
        "event": letter.event,
        "queue": letter.queue,
        "service": letter.service,
        "reason": letter.reason,
        "exception_type": letter.exception_type,
        "exception_message": letter.exception_message,
        "status": letter.status,
        "occurrences": letter.occurrences,
        "attempts": letter.attempts,
        "correlation_id": letter.correlation_id,
        "source": letter.source,
        "failed_at": _iso(letter.failed_at),
        "first_seen_at": _iso(letter.first_seen_at),
        "last_seen_at": _iso(letter.last_seen_at),
        "last_retried_at": _iso(letter.last_retried_at),
        "origin_problem": letter.origin_problem,
    }


def plain(value: Any) -> Any:
    """Stored (tagged) header values as plain JSON: bytes as text, times as ISO 8601."""
    decoded = parse.from_json(value)

    def convert(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.decode("utf-8", "replace")
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list):
            return [convert(x) for x in v]
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)  # JSON has no NaN or infinity
        return str(v) if not isinstance(v, str | int | float | bool | type(None)) else v

    return convert(decoded)


def detail(d: Detail) -> dict[str, Any]:
    letter = d.letter
    try:
        body: str | None = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        body = None
    return {
        **item(letter),
        "exchange": letter.exchange,
        "routing_key": letter.routing_key,
        "content_type": letter.content_type,
        "user_id": _user_id(letter),
        "headers": plain(letter.headers),
        "properties": plain(letter.properties),
        "body": body,
        "body_base64": base64.b64encode(letter.body).decode(),
        "traceback": letter.traceback,
        "history": [
            {
                "at": _iso(a.at),
                "actor": a.actor,
                "action": a.action,
                "result": a.result,
                "detail": a.detail,
                "body": a.body.decode("utf-8", "replace") if a.body is not None else None,
            }
            for a in d.actions
        ],
        "occurrence_log": [
            {
                "seen_at": _iso(o.seen_at),
                "reason": o.reason,
                "exception_type": o.exception_type,
                "exception_message": o.exception_message,
                "replay_of": o.replay_of,
                **_occurrence_body(o.body),
            }
            for o in d.occurrences
        ],
        "conversation": [item(x) for x in d.conversation],
    }


def _user_id(letter: Letter) -> str | None:
    """The AMQP ``user_id`` the broker checked against the publishing connection."""
    value = letter.properties.get("user_id") if isinstance(letter.properties, dict) else None
    return value if isinstance(value, str) else None


def _occurrence_body(body: bytes | None) -> dict[str, Any]:
    """An occurrence's own body, present only when it differs from the letter's."""
    if body is None:
        return {"body_differs": False}
    try:
        text_body: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text_body = None
    return {
        "body_differs": True,
        "body": text_body,
        "body_base64": base64.b64encode(body).decode(),
    }


def filters_from(
    queue: str | None = None,
    event: str | None = None,
    service: str | None = None,
    reason: str | None = None,
    status: str | None = None,
    exception_type: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    q: str | None = None,
) -> Filters:
    if status and status not in {s.value for s in Status}:
        raise HTTPException(422, f"status must be one of {', '.join(s.value for s in Status)}")
    return Filters(queue, event, service, reason, status, exception_type, since, until, q)


def replay_status(error: ReplayError) -> int:
    if isinstance(error, LetterNotFound):
        return 404
    if isinstance(error, NotRetryable | QueueMissing | NotReplayable):
        return 409
    if isinstance(error, InvalidBody):
        return 422
    if isinstance(error, BrokerUnavailable):
        return 503
    return 500


def api_user(request: Request) -> str:
    """The caller, per the app's :class:`~letterthief.auth.Auth` (401 when unknown)."""
    auth: Auth = request.app.state.auth
    return auth.api_user(request)


User = Annotated[str, Depends(api_user)]


def get_thief(request: Request) -> LetterThief:
    """The service this app serves (``create_app`` puts it in ``app.state``)."""
    thief: LetterThief = request.app.state.thief
    return thief


Thief = Annotated[LetterThief, Depends(get_thief)]

router = APIRouter()
"""The API routes; every route but ``/healthz`` asks who is calling."""


@router.get("/healthz", include_in_schema=False)
async def healthz(thief: Thief) -> JSONResponse:
    state = thief.status()
    try:
        async with thief.store.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        state["database"] = "ok"
    except Exception as exc:
        state["database"] = f"unavailable: {type(exc).__name__}"
    healthy = state["database"] == "ok" and thief.collector.ready.is_set()
    state["status"] = "ok" if healthy else "degraded"
    return JSONResponse(state, status_code=200 if healthy else 503)


@router.get("/api/openapi.json", include_in_schema=False)
async def openapi(request: Request, _: User) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/metrics", include_in_schema=False)
async def metrics(thief: Thief, _: User) -> Response:
    thief.metrics.set_letters(await thief.store.counts())
    return Response(thief.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/dead-letters")
async def list_letters(
    thief: Thief,
    _: User,
    filters: Annotated[Filters, Depends(filters_from)],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    try:
        page = await thief.store.page(filters, limit=limit, cursor=cursor)
    except BadCursor as exc:
        raise HTTPException(422, str(exc)) from exc
    return {
        "items": [item(x) for x in page.items],
        "total": page.total,
        "next_cursor": page.next_cursor,
    }


@router.get("/api/groups")
async def groups(thief: Thief, _: User) -> dict[str, Any]:
    return {"items": [_group(g) for g in await thief.store.groups()]}


@router.get("/api/dead-letters/{letter_id}")
async def get_letter(letter_id: int, thief: Thief, _: User) -> dict[str, Any]:
    d = await thief.store.detail(letter_id)
    if d is None:
        raise HTTPException(404, f"there is no letter {letter_id}")
    return detail(d)


@router.post("/api/dead-letters/retry")
async def retry_many(request: IdsRequest, thief: Thief, who: User) -> dict[str, Any]:
    job = thief.jobs.new("retry", who, len(request.ids))
    await thief.replayer.retry_many(request.ids, who, job)
    return job.as_dict()


@router.post("/api/dead-letters/archive")
async def archive_many(request: IdsRequest, thief: Thief, who: User) -> dict[str, Any]:
    changed = await thief.store.set_status(request.ids, Status.ARCHIVED, who)
    return {"archived": changed}


@router.post("/api/dead-letters/restore")
async def restore_many(request: IdsRequest, thief: Thief, who: User) -> dict[str, Any]:
    changed = await thief.store.set_status(request.ids, Status.OPEN, who)
    return {"restored": changed}


@router.post("/api/dead-letters/{letter_id}/retry")
async def retry(
    letter_id: int, thief: Thief, who: User, request: RetryRequest | None = None
) -> dict[str, Any]:
    try:
        letter = await thief.replayer.retry(
            letter_id, who, request.body if request is not None else None
        )
    except ReplayError as exc:
        raise HTTPException(replay_status(exc), str(exc)) from exc
    return item(letter)


async def _set(thief: LetterThief, letter_id: int, who: str, status: Status) -> dict[str, Any]:
    letter = await thief.store.get(letter_id)
    if letter is None:
        raise HTTPException(404, f"there is no letter {letter_id}")
    if not await thief.store.set_status([letter_id], status, who) and letter.status != status:
        raise HTTPException(409, f"letter {letter_id} is {letter.status}")
    after = await thief.store.get(letter_id)
    assert after is not None
    return item(after)


@router.post("/api/dead-letters/{letter_id}/archive")
async def archive(letter_id: int, thief: Thief, who: User) -> dict[str, Any]:
    return await _set(thief, letter_id, who, Status.ARCHIVED)


@router.post("/api/dead-letters/{letter_id}/restore")
async def restore(letter_id: int, thief: Thief, who: User) -> dict[str, Any]:
    return await _set(thief, letter_id, who, Status.OPEN)


def _group(g: Group) -> dict[str, Any]:
    return {
        "queue": g.queue,
        "exception_type": g.exception_type,
        "reason": g.reason,
        "count": g.count,
        "first_seen_at": _iso(g.first_seen_at),
        "last_seen_at": _iso(g.last_seen_at),
        "last_retried_at": _iso(g.last_retried_at),
        "event": g.event,
        "exception_message": g.exception_message,
    }
