"""Idempotency stores: a listener handles each message id once.

:func:`open_store` picks the store from ``PIGEON_IDEMPOTENCY_URL``. The
Redis and PostgreSQL stores import their drivers only when asked for, so the
default install (memory, SQLite) needs no extra.
"""

from __future__ import annotations

from pigeon.errors import ConfigurationError
from pigeon.idempotency.base import Claim, ClaimState, IdempotencyStore
from pigeon.settings import IDEMPOTENCY_SCHEMES as _SCHEMES
from pigeon.settings import mask_url

__all__ = ["Claim", "ClaimState", "IdempotencyStore", "open_store"]


def open_store(url: str, *, retention: float = 7 * 24 * 3600) -> IdempotencyStore:
    """Build the store ``url`` names; ``await store.open()`` (or ``async with``) before use.

    ``memory://``; ``sqlite:///relative/path.db`` or ``sqlite:////abs/path.db``;
    ``redis://host:port/db`` or ``rediss://``; ``postgresql://``,
    ``postgres://`` or ``postgresql+asyncpg://``.

    Raises :class:`~pigeon.errors.ConfigurationError` (a ``ValueError``) for an
    unknown scheme or a malformed SQLite URL, and
    ``ImportError`` naming the extra to install when the driver is missing.
    Passwords in ``url`` never appear in either message.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigurationError(
            f"idempotency URL has no scheme: it must start with one of {_SCHEMES}"
        )
    scheme = scheme.lower()
    if scheme == "memory":
        from pigeon.idempotency.memory import MemoryStore

        return MemoryStore(retention=retention)
    if scheme == "sqlite":
        from pigeon.idempotency.sqlite import SQLiteStore

        path = rest[1:].partition("?")[0]
        if not rest.startswith("/") or not path:
            raise ConfigurationError(
                f"idempotency URL {mask_url(url)} has no file path: use "
                "sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return SQLiteStore(path, retention=retention)
    if scheme in ("redis", "rediss"):
        try:
            from pigeon.idempotency.redis import RedisStore
        except ImportError as exc:
            _explain_missing(exc, url, package="redis", extra="redis")
            raise
        return RedisStore(url, retention=retention)
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        try:
            from pigeon.idempotency.postgres import PostgresStore
        except ImportError as exc:
            _explain_missing(exc, url, package="asyncpg", extra="postgres")
            raise
        return PostgresStore("postgresql://" + rest, retention=retention)
    raise ConfigurationError(
        f"unsupported idempotency URL {mask_url(url)}: the scheme must be one of {_SCHEMES}"
    )


def _explain_missing(exc: ImportError, url: str, *, package: str, extra: str) -> None:
    """Raise an ImportError naming the extra if ``exc`` is ``package`` missing; else return."""
    if exc.name is None or exc.name.partition(".")[0] != package:
        return
    raise ImportError(
        f"idempotency URL {mask_url(url)} needs the {package} package: "
        f"pip install 'pigeon-bus[{extra}]'",
        name=package,
    ) from exc
