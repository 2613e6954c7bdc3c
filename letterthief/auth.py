"""Who is asking: a signed session cookie (UI), HTTP Basic or a Bearer token (API).

With ``LETTERTHIEF_USERNAME``/``LETTERTHIEF_PASSWORD`` set, the UI asks for a
login and the API accepts the same pair as HTTP Basic; ``LETTERTHIEF_API_TOKEN``
is accepted as ``Authorization: Bearer``. With neither, everyone is
``anonymous`` — which ``letterthief serve`` only allows on a loopback address.

Every session (anonymous ones too) carries a CSRF token; forms post it back
and the API wants it in ``X-CSRF-Token`` when it is called with the cookie.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer

from letterthief.settings import LetterThiefSettings

COOKIE = "letterthief_session"
ANONYMOUS = "anonymous"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Session:
    user: str | None
    csrf: str


class Auth:
    def __init__(self, settings: LetterThiefSettings, secret_key: str) -> None:
        self.settings = settings
        self.serializer = URLSafeTimedSerializer(secret_key, salt="letterthief-session")
        self.secure_cookie = settings.public_url.startswith("https://")

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

    def read(self, request: Request) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data: Any = self.serializer.loads(raw, max_age=self.settings.session_max_age)
        except BadSignature:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        user = data.get("u")
        return Session(user if isinstance(user, str) else None, data["csrf"])

    def write(self, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.serializer.dumps({"u": session.user, "csrf": session.csrf}),
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
        if scheme.lower() == "bearer" and token and hmac.compare_digest(value.strip(), token):
            return "api-token"
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            if self.check_password(user, password):
                return user
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
