"""Which hosts and origins LetterThief answers: its defence against DNS rebinding.

Without credentials (the open mode, loopback only) anyone who can make a
browser send a request to 127.0.0.1 could act as the operator: a site whose
name first resolves to the attacker and then to 127.0.0.1 is "same origin"
with LetterThief for that browser. So in the open mode only loopback host
names and the host of ``LETTERTHIEF_PUBLIC_URL`` are served. In every mode a
state-changing request that carries an ``Origin`` must come from
LetterThief's own origin (the request's own host, or the public URL);
``Origin: null`` is refused.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request

from letterthief.settings import LetterThiefSettings, is_loopback

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _host_name(host: str) -> str:
    """``host[:port]`` (or ``[v6]:port``) → the name alone, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def refusal(request: Request, settings: LetterThiefSettings) -> str | None:
    """Why ``request`` is refused (403), or ``None`` to serve it."""
    host = request.headers.get("host", "")
    public = urlsplit(settings.public_url).hostname or ""
    open_mode = not settings.has_login and settings.token is None
    name = _host_name(host)
    if open_mode and not (is_loopback(name) or name == public.lower()):
        return (
            f"Host {host!r} is not served: without credentials LetterThief only answers "
            "loopback names and the host of LETTERTHIEF_PUBLIC_URL"
        )
    origin = request.headers.get("origin")
    if request.method in SAFE_METHODS or origin is None:
        return None
    allowed = {_origin(settings.public_url), f"{request.url.scheme}://{host}".lower()}
    if origin.lower() not in allowed:
        return (
            f"a request from origin {origin!r} may not change anything here; use LetterThief "
            "from its own address (LETTERTHIEF_PUBLIC_URL)"
        )
    return None
