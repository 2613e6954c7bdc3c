"""The web UI: server-rendered pages, forms with CSRF tokens, no third-party assets.

Everything a message carries (body, headers, exception text) is rendered
through Jinja2's autoescaping, and every response carries a strict
Content-Security-Policy (scripts and styles only from ``/static``), so a
hostile payload is shown, never run. :func:`create_app` also mounts the JSON
API from :mod:`letterthief.api`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import BaseHTTPMiddleware

from letterthief import api, guard, parse
from letterthief.auth import Auth, Session, client_keys, too_many
from letterthief.models import Status
from letterthief.queries import BadCursor, Filters
from letterthief.replay import ReplayError
from letterthief.sessions import Sessions

if TYPE_CHECKING:
    from letterthief.service import LetterThief

HERE = Path(__file__).parent
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
FILTER_COLUMNS = ("queue", "event", "service", "reason", "exception_type")


class LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


def ago(value: datetime | None) -> str:
    """ "3 min ago"-style age, for scanning a list at 3 a.m."""
    if value is None:
        return "never"
    seconds = (datetime.now(UTC) - value).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now" if seconds < 5 else f"{int(seconds)} s ago"


def utc(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters.update(ago=ago, utc=utc, display=parse.display)
    env.globals["urlencode"] = urlencode
    return env


class _Distinct:
    """Filter drop-down values, cached briefly so the list page stays cheap."""

    def __init__(self, thief: LetterThief, ttl: float = 30.0) -> None:
        self.thief = thief
        self.ttl = ttl
        self.cached: tuple[float, dict[str, list[str]]] | None = None

    async def get(self) -> dict[str, list[str]]:
        if self.cached is None or time.monotonic() - self.cached[0] > self.ttl:
            values = {c: await self.thief.store.distinct(c) for c in FILTER_COLUMNS}
            self.cached = (time.monotonic(), values)
        return self.cached[1]


def _when(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def ui_filters(params: Any) -> Filters:
    """Filters from the list page's query string; the UI shows open letters unless told."""
    status = params.get("status", Status.OPEN.value)
    return Filters(
        queue=params.get("queue") or None,
        event=params.get("event") or None,
        service=params.get("service") or None,
        reason=params.get("reason") or None,
        status=None if status in ("", "any") else status,
        exception_type=params.get("exception_type") or None,
        since=_when(params.get("since")),
        until=_when(params.get("until")),
        q=params.get("q") or None,
    )


def _safe_next(url: str | None) -> str:
    """Only same-site paths: a login link must not bounce to another site."""
    if not url or not url.startswith("/") or url.startswith("//") or "\\" in url:
        return "/"
    return url


def create_app(thief: LetterThief) -> FastAPI:
    """The ASGI app for ``thief`` (which the caller starts and stops)."""
    auth = Auth(
        thief.settings,
        thief.secret_key,
        Sessions(thief.store.engine, timedelta(seconds=thief.settings.session_max_age)),
    )
    app = FastAPI(title="LetterThief", docs_url=None, redoc_url=None, openapi_url=None)
    env = _environment()
    distinct = _Distinct(thief)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.state.auth = auth
    app.state.thief = thief
    app.state.env = env
    app.state.distinct = distinct
    app.include_router(api.router)

    app.add_middleware(BaseHTTPMiddleware, dispatch=security_headers)
    app.add_exception_handler(LoginRequired, to_login)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]
    app.include_router(pages)
    return app


pages = APIRouter()
"""The UI's routes; each reads the service and its auth from ``app.state``."""


def _thief(request: Request) -> LetterThief:
    thief: LetterThief = request.app.state.thief
    return thief


def _auth(request: Request) -> Auth:
    auth: Auth = request.app.state.auth
    return auth


async def security_headers(request: Request, call_next: Any) -> Response:
    """Refuse foreign hosts and origins (:mod:`letterthief.guard`), check the session once,
    and send the security headers with every response."""
    refused = guard.refusal(request, _thief(request).settings)
    if refused is not None:
        response: Response = PlainTextResponse(refused, status_code=403)
    else:
        await _auth(request).resolve(request)
        response = await call_next(request)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    if not request.url.path.startswith("/static"):
        response.headers["Cache-Control"] = "no-store"
    return response


async def to_login(request: Request, exc: LoginRequired) -> Response:
    return RedirectResponse(f"/login?{urlencode({'next': exc.next_url})}", status_code=303)


async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if request.url.path.startswith("/api/") or request.url.path in ("/metrics", "/healthz"):
        return await _json_error(exc)
    return render(
        request,
        "error.html",
        status=exc.status_code,
        code=exc.status_code,
        message=str(exc.detail),
    )


def render(request: Request, template: str, *, status: int = 200, **context: Any) -> HTMLResponse:
    """A page, with the session's user and CSRF token (a new session's cookie is set)."""
    auth = _auth(request)
    session, fresh = auth.ensure(request)
    html = request.app.state.env.get_template(template).render(
        request=request,
        user=auth.ui_user(session),
        login_required=auth.login_required,
        csrf=session.csrf,
        notice=request.query_params.get("notice", ""),
        error=request.query_params.get("error", ""),
        **context,
    )
    response = HTMLResponse(html, status_code=status)
    if fresh:
        auth.write(response, session)
    return response


def who(request: Request) -> tuple[Session | None, str]:
    """The session and user of a page request; raises :class:`LoginRequired` without one."""
    auth = _auth(request)
    session = auth.read(request)
    user = auth.ui_user(session)
    if user is None:
        raise LoginRequired(
            str(request.url.path) + (f"?{request.url.query}" if request.url.query else "")
        )
    return session, user


async def form_of(request: Request) -> tuple[str, Any]:
    """The posting user and the form, once its CSRF token checked out."""
    session, user = who(request)
    form = await request.form()
    token = form.get("csrf")
    _auth(request).check_csrf(
        session or _auth(request).read(request), token if isinstance(token, str) else None
    )
    return user, form


def back(url: str, **params: str) -> RedirectResponse:
    sep = "&" if "?" in url else "?"
    query = urlencode({k: v for k, v in params.items() if v})
    return RedirectResponse(f"{url}{sep}{query}" if query else url, status_code=303)


# -- login ----------------------------------------------------------------------


@pages.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    return render(request, "login.html", next=_safe_next(request.query_params.get("next")))


@pages.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    token = form.get("csrf")
    _auth(request).check_csrf(
        _auth(request).read(request), token if isinstance(token, str) else None
    )
    username, password = str(form.get("username", "")), str(form.get("password", ""))
    target = _safe_next(str(form.get("next", "/")))
    keys = client_keys(request, username)
    if (wait := _auth(request).throttle.retry_after(*keys)) is not None:
        raise too_many(wait)
    if not _auth(request).check_password(username, password):
        _auth(request).throttle.failed(*keys)
        await _auth(request).reject_slowly()
        return render(
            request,
            "login.html",
            status=401,
            next=target,
            login_error="That username and password do not match LETTERTHIEF_USERNAME / "
            "LETTERTHIEF_PASSWORD.",
        )
    response = RedirectResponse(target, status_code=303)
    await _auth(request).log_in(response, username)
    return response


@pages.post("/logout")
async def logout(request: Request) -> Response:
    await form_of(request)
    response = RedirectResponse("/login", status_code=303)
    await _auth(request).log_out(request, response)
    return response


# -- pages ----------------------------------------------------------------------


@pages.get("/", response_class=HTMLResponse)
async def dashboard(request: Request) -> Response:
    who(request)
    return render(
        request,
        "dashboard.html",
        groups=await _thief(request).store.groups(),
        totals=await _thief(request).store.status_totals(),
        health=_thief(request).health(),
    )


@pages.get("/letters", response_class=HTMLResponse)
async def letters(request: Request) -> Response:
    who(request)
    filters = ui_filters(request.query_params)
    try:
        limit = min(max(int(request.query_params.get("limit", "50")), 1), 500)
    except ValueError:
        limit = 50
    try:
        page = await _thief(request).store.page(
            filters, limit=limit, cursor=request.query_params.get("cursor") or None
        )
    except BadCursor as exc:
        raise HTTPException(422, str(exc)) from exc
    params = {
        k: v for k, v in request.query_params.items() if k not in ("cursor", "notice", "error")
    }
    return render(
        request,
        "letters.html",
        page=page,
        filters=filters,
        params=params,
        status_param=request.query_params.get("status", Status.OPEN.value),
        choices=await request.app.state.distinct.get(),
        statuses=[s.value for s in Status],
        here=str(request.url.path) + (f"?{request.url.query}" if request.url.query else ""),
    )


@pages.get("/letters/{letter_id}", response_class=HTMLResponse)
async def letter(request: Request, letter_id: int) -> Response:
    who(request)
    d = await _thief(request).store.detail(letter_id)
    if d is None:
        raise HTTPException(404, f"There is no letter {letter_id}. It may have been purged.")
    kind, body = parse.body_view(d.letter.body, d.letter.content_type)
    return render(
        request,
        "letter.html",
        d=d,
        letter=d.letter,
        body_kind=kind,
        body=body,
        headers=sorted(d.letter.headers.items()),
        properties=sorted(d.letter.properties.items()),
    )


@pages.get("/letters/{letter_id}/edit", response_class=HTMLResponse)
async def edit_page(request: Request, letter_id: int) -> Response:
    who(request)
    letter = await _thief(request).store.get(letter_id)
    if letter is None:
        raise HTTPException(404, f"There is no letter {letter_id}.")
    kind, body = parse.body_view(letter.body, letter.content_type)
    return render(
        request,
        "edit.html",
        letter=letter,
        body=body,
        body_kind=kind,
        is_json=parse.is_json_type(letter.content_type),
    )


@pages.post("/letters/{letter_id}/retry")
async def retry(request: Request, letter_id: int) -> Response:
    user, form = await form_of(request)
    body = form.get("body")
    edited = body.replace("\r\n", "\n") if isinstance(body, str) else None
    url = f"/letters/{letter_id}"
    try:
        await _thief(request).replayer.retry(letter_id, user, edited)
    except ReplayError as exc:
        if edited is not None and api.replay_status(exc) == 422:
            letter = await _thief(request).store.get(letter_id)
            assert letter is not None
            return render(
                request,
                "edit.html",
                status=422,
                letter=letter,
                body=edited,
                body_kind="json",
                is_json=True,
                edit_error=str(exc),
            )
        return back(url, error=str(exc))
    return back(
        url,
        notice="Sent back to its queue. It is marked retried; if it fails again it reopens here.",
    )


@pages.post("/letters/{letter_id}/{action}")
async def set_status(request: Request, letter_id: int, action: str) -> Response:
    user, _ = await form_of(request)
    if action not in ("archive", "restore"):
        raise HTTPException(404, "unknown action")
    status = Status.ARCHIVED if action == "archive" else Status.OPEN
    changed = await _thief(request).store.set_status([letter_id], status, user)
    url = f"/letters/{letter_id}"
    if not changed:
        return back(url, error="Nothing changed: the letter was not in that state.")
    return back(url, notice=f"Letter {'archived' if action == 'archive' else 'restored'}.")


@pages.post("/bulk")
async def bulk(request: Request) -> Response:
    user, form = await form_of(request)
    action = str(form.get("action", ""))
    if form.get("group_queue") is not None:
        ids = await _thief(request).store.group_ids(
            str(form.get("group_queue")),
            str(form.get("group_exception_type", "")),
            str(form.get("group_reason", "")),
        )
    else:
        ids = [int(i) for i in form.getlist("ids") if str(i).isdigit()]
    return_to = _safe_next(str(form.get("back", "/letters")))
    if not ids:
        return back(return_to, error="Select at least one letter first.")
    if action == "retry":
        job = _thief(request).jobs.new("retry", user, len(ids))
        _thief(request).jobs.run(_thief(request).replayer.retry_many(ids, user, job))
        return back(f"/jobs/{job.id}", back=return_to)
    if action in ("archive", "restore"):
        status = Status.ARCHIVED if action == "archive" else Status.OPEN
        changed = await _thief(request).store.set_status(ids, status, user)
        verb = "Archived" if action == "archive" else "Restored"
        return back(return_to, notice=f"{verb} {len(changed)} of {len(ids)} letters.")
    raise HTTPException(422, f"unknown action {action!r}")


@pages.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str) -> Response:
    who(request)
    job = _thief(request).jobs.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, "That job is not known (jobs are kept until a restart).")
    return render(
        request, "job.html", job=job, back_to=_safe_next(request.query_params.get("back"))
    )


async def _json_error(exc: StarletteHTTPException) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
