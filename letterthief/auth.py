"""Who is asking: a signed session cookie (UI), HTTP Basic or a Bearer token (API).

With ``LETTERTHIEF_USERNAME``/``LETTERTHIEF_PASSWORD`` set, the UI asks for a
login and the API accepts the same pair as HTTP Basic; ``LETTERTHIEF_API_TOKEN``
is accepted as ``Authorization: Bearer``. With neither, everyone is
``anonymous`` — which ``letterthief serve`` only allows on a loopback address.

Every session (anonymous ones too) carries a CSRF token; forms post it back
and the API wants it in ``X-CSRF-Token`` when it is called with the cookie.
A logged-in session's cookie names a row of :mod:`letterthief.sessions`,
checked on every request (:meth:`Auth.resolve`): logout revokes it, and it is
bound to the credentials it was opened with. Login issues a new CSRF token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from letterthief.sessions import Sessions
from letterthief.settings import LetterThiefSettings

COOKIE = "letterthief_session"
ANONYMOUS = "anonymous"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


_UNRESOLVED = object()
THROTTLE_WINDOW = 60.0
THROTTLE_KEYS = 10_000


class Throttle:
    """Wrong passwords per client address and per username in a sliding minute.

    Past ``limit`` failures a key is refused (429) until its oldest failure
    leaves the window, right password or not: a guesser learns nothing more.
    Kept in memory (a restart forgets it) and bounded in size.
    """

    def __init__(self, limit: int, window: float = THROTTLE_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self.failures.get(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            self.failures.pop(key, None)
        return times

    def retry_after(self, *keys: str) -> float | None:
        """Seconds until ``keys`` may try again, or ``None`` when none is blocked."""
        now = time.monotonic()
        waits = [
            times[0] + self.window - now
            for key in keys
            if len(times := self._recent(key, now)) >= self.limit
        ]
        return max(waits) if waits else None

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        for key in keys:
            self.failures.setdefault(key, deque()).append(now)
        while len(self.failures) > THROTTLE_KEYS:
            self.failures.pop(next(iter(self.failures)))


def too_many(retry_after: float) -> HTTPException:
    return HTTPException(
        429,
        "too many wrong passwords from this address or for this user; wait a minute",
        headers={"Retry-After": str(max(1, int(retry_after + 0.999)))},
    )


def client_keys(request: Request, user: str) -> tuple[str, str]:
    """The throttle's keys of a login attempt: the client address and the username."""
    address = request.client.host if request.client is not None else "?"
    return f"ip:{address}", f"user:{user}"


@dataclass(frozen=True, slots=True)
class Session:
    user: str | None
    csrf: str
    sid: str | None = None


class Auth:
    def __init__(
        self, settings: LetterThiefSettings, secret_key: str, sessions: Sessions | None = None
    ) -> None:
        self.settings = settings
        self.serializer = URLSafeTimedSerializer(secret_key, salt="letterthief-session")
        self.secure_cookie = settings.public_url.startswith("https://")
        self.sessions = sessions
        self.throttle = Throttle(settings.login_attempts)
        password = settings.password.get_secret_value() if settings.password else ""
        self.credentials = hmac.new(
            secret_key.encode(),
            f"{settings.username or ''}\0{password}".encode(),
            hashlib.sha256,
        ).hexdigest()[:32]

    @property
    def login_required(self) -> bool:
        return self.settings.has_login

    @property
    def api_auth_required(self) -> bool:
        return self.settings.has_login or self.settings.token is not None

    def check_password(self, username: str, password: str) -> bool:
        """Constant-time comparison of both fields against the configured pair."""
        expected_user = self.settings.username or ""
        expected_pw = self.settings.password.get_secret_value() if self.settings.password else ""
        if not expected_user or not expected_pw:
            return False
        user_ok = hmac.compare_digest(username.encode(), expected_user.encode())
        pw_ok = hmac.compare_digest(password.encode(), expected_pw.encode())
        return user_ok and pw_ok

    async def reject_slowly(self) -> None:
        """A failed login costs the guesser a little time."""
        await asyncio.sleep(0.3)

    # -- sessions --------------------------------------------------------------------

    def _decode(self, request: Request) -> Session | None:
        """The cookie's session as signed; a user only with a session id (checked later)."""
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data: Any = self.serializer.loads(raw, max_age=self.settings.session_max_age)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        user, sid = data.get("u"), data.get("sid")
        if not isinstance(user, str) or not isinstance(sid, str):
            return Session(None, data["csrf"])
        return Session(user, data["csrf"], sid)

    async def resolve(self, request: Request) -> None:
        """Check this request's session against the database, once, before any handler."""
        session = self._decode(request)
        if session is not None and session.sid is not None:
            live = self.sessions is not None and await self.sessions.valid(
                session.sid, session.user or "", self.credentials
            )
            if not live:
                session = None
        request.state.lt_session = session

    def read(self, request: Request) -> Session | None:
        """This request's session, as :meth:`resolve` found it."""
        session = getattr(request.state, "lt_session", _UNRESOLVED)
        if session is _UNRESOLVED:  # not resolved: only an anonymous session counts
            decoded = self._decode(request)
            return Session(None, decoded.csrf) if decoded is not None else None
        return session  # type: ignore[return-value]

    async def log_in(self, response: Response, user: str) -> Session:
        """Open a server-side session with a fresh CSRF token and set its cookie."""
        session = Session(user, secrets.token_urlsafe(24), secrets.token_urlsafe(32))
        if self.sessions is not None:
            assert session.sid is not None
            await self.sessions.open(session.sid, user, self.credentials)
        self.write(response, session)
        return session

    async def log_out(self, request: Request, response: Response) -> None:
        session = self.read(request)
        if session is not None and session.sid is not None and self.sessions is not None:
            await self.sessions.revoke(session.sid)
        self.clear(response)

    def write(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.serializer.dumps({"u": session.user, "csrf": session.csrf, "sid": session.sid}),
            max_age=self.settings.session_max_age,
            httponly=True,
            samesite="lax",
            secure=self.secure_cookie,
        )

    def clear(self, response: Response) -> None:
        response.delete_cookie(COOKIE)

    def ensure(self, request: Request) -> tuple[Session, bool]:
        """This request's session, or a fresh anonymous one (True: set the cookie)."""
        session = self.read(request)
        if session is not None:
            return session, False
        return Session(None, secrets.token_urlsafe(24)), True

    def ui_user(self, session: Session | None) -> str | None:
        """The logged-in user, ``anonymous`` when no login is configured, else ``None``."""
        if not self.login_required:
            return session.user if session and session.user else ANONYMOUS
        return session.user if session else None

    def check_csrf(self, session: Session | None, token: str | None) -> None:
        if session is None or not token or not hmac.compare_digest(session.csrf, token):
            raise HTTPException(
                403, "the form's security token is missing or stale; reload the page and retry"
            )

    # -- the API ---------------------------------------------------------------------

    def api_user(self, request: Request) -> str:
        """The API caller's name; raises 401 (with the way to authenticate) or 403."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        token = self.settings.token
        if scheme.lower() == "bearer" and token:
            address = client_keys(request, "")[0]
            if (wait := self.throttle.retry_after(address)) is not None:
                raise too_many(wait)
            if hmac.compare_digest(
                value.strip().encode("utf-8", "surrogateescape"), token.encode()
            ):
                return "api-token"
            self.throttle.failed(address)
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            keys = client_keys(request, user)
            if (wait := self.throttle.retry_after(*keys)) is not None:
                raise too_many(wait)
            if self.check_password(user, password):
                return user
            self.throttle.failed(*keys)
        session = self.read(request)
        if session is not None and (session.user or not self.login_required):
            if request.method not in SAFE_METHODS:
                self.check_csrf(session, request.headers.get("x-csrf-token"))
            return session.user or ANONYMOUS
        if not self.api_auth_required:
            if request.method not in SAFE_METHODS and not _is_json(request):
                raise HTTPException(
                    415, "send the request with Content-Type: application/json"
                )  # a cross-site form cannot, so anonymous access is not a CSRF hole
            return ANONYMOUS
        raise HTTPException(
            401,
            "authenticate with HTTP Basic (LETTERTHIEF_USERNAME/LETTERTHIEF_PASSWORD) or "
            "Authorization: Bearer <LETTERTHIEF_API_TOKEN>",
            headers={"WWW-Authenticate": 'Basic realm="LetterThief", charset="UTF-8"'},
        )


def _is_json(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip() == "application/json"
